"""Attention efficiency benchmark: time and peak memory of Flow-Attention against its official formulations and
the baselines, for growing sequence lengths. `make bench` runs it; `make bench ARGS=--quick` is the fast check.

    python -m experiments.bench                      # full run: L = 256 ... 65536, forward and forward+backward
    python -m experiments.bench --quick              # L in {256, 1024, 4096}, few repeats
    python -m experiments.bench --variants flow_causal:32,flow_causal:64,flow_causal:128 --tag chunk_sweep
    python -m experiments.bench --device cuda        # on a GPU: fp32 and bf16, adds FlashAttention
    python -m experiments.bench --from-json results/bench/efficiency.json   # re-render table and figure only
    python -m experiments.bench.targets results/bench/efficiency.json       # check a run against the targets

Attention alone, on random q, k, v of shape (B, H, L, d) = (1, 8, L, 64); fp32 on CPU (bf16 added on a GPU), at
torch's default thread count. Files:
    variants.py   what is measured: the attentions, their FLOP counts, how each is built
    measure.py    one measurement in the process that runs it: warm-up, peak memory, median time
    isolation.py  each configuration in a fresh process (multiprocessing: a fork server, or spawn)
    runner.py     the schedule (interleaved lengths, budgets, rounds) and the command line
    report.py     the JSON, the Markdown table of measurements and ratios, the figure
    targets.py    the thresholds set by the issues, checked against a run
Outputs: results/bench/<tag>.json (every measurement, settings, machine), results/bench/<tag>.md and
results/figures/<tag>.png (log-log time and memory against L).
"""
