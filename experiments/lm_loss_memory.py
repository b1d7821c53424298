"""Peak memory of the WikiText-103 output layer's loss, forward and backward: plain against chunked cross-entropy.

    python -m experiments.lm_loss_memory [--tokens 2048] [--vocab-size 267744] [--d-model 512] [--chunks 1024 256]

Each variant runs in a fresh process on CPU (fp32): the hidden states (tokens, D) and the tied output weight (V, D)
are allocated first, then the peak resident memory added by one forward and backward pass is reported, with its
time. "plain" is `F.cross_entropy(hidden @ weight.T, target)` (the (tokens, V) logits, their log-probabilities and
gradient live at once); "chunked N" is `tasks.wikitext103.loss.linear_cross_entropy(..., chunk_tokens=N)`. The
weight's own gradient (V × D × 4 bytes) is part of every variant's figure. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence

from tabulate import tabulate


def measure(variant: str, tokens: int, vocab_size: int, d_model: int) -> dict[str, float]:
    """Run one variant in this process: {"peak_mib": added peak RSS, "seconds": forward + backward time}."""
    import torch
    import torch.nn.functional as F

    from tasks.wikitext103.loss import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(tokens, d_model, requires_grad=True)
    weight = torch.randn(vocab_size, d_model).mul_(d_model**-0.5).requires_grad_()  # no temporary (peak = use)
    target = torch.randint(0, vocab_size, (tokens,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if variant == "plain":
        loss = F.cross_entropy(hidden @ weight.T, target)
    else:
        nll, count = linear_cross_entropy(hidden, weight, target, chunk_tokens=int(variant.split()[1]))
        loss = nll / count
    loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_mib": (peak - before) / 1024, "seconds": seconds, "loss": loss.item()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.lm_loss_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch (the paper: 2,048)")
    parser.add_argument("--vocab-size", type=int, default=267_744)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 256])
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args.tokens, args.vocab_size, args.d_model)))
        return 0
    rows = []
    for variant in ["plain", *(f"chunked {n}" for n in args.chunks)]:
        command = [sys.executable, "-m", "experiments.lm_loss_memory", "--variant", variant, "--tokens",
                   str(args.tokens), "--vocab-size", str(args.vocab_size), "--d-model", str(args.d_model)]
        result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
        rows.append([variant, f"{result['peak_mib']:.0f}", f"{result['seconds']:.2f}", f"{result['loss']:.5f}"])
        print(f"{variant}: {result}", flush=True)
    logits_mib = args.tokens * args.vocab_size * 4 / 2**20
    print(f"\n{args.tokens} tokens x {args.vocab_size:,} words x width {args.d_model}, fp32 on CPU; one (tokens, V) "
          f"fp32 tensor is {logits_mib:.0f} MiB\n")
    print(tabulate(rows, headers=["loss", "added peak memory (MiB)", "forward + backward (s)", "loss value"],
                   tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
