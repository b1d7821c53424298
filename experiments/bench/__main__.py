import sys

from experiments.bench.runner import main

sys.exit(main())
