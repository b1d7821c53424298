"""D4RL offline RL with the Decision Transformer: datasets (D4RL's HDF5 files, Minari), training windows, rollout
evaluation in MuJoCo, the collector and the download check."""
