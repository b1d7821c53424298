"""Turn run directories (and optionally W&B runs) into the paper's five tables.

Entry point: ``python -m results.aggregate --runs DIR --out DIR`` (``make tables``).
The paper's own numbers live in ``results/paper/*.csv``; nothing in code repeats them.
"""
