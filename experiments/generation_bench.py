"""Generation speed of the WikiText-103 model: tokens per second after a context of 512, 2k and 8k tokens.

    python -m experiments.generation_bench [--contexts 512 2048 8192] [--new-tokens 32] [--device cpu] [--quick]

Three ways to draw the next token, on the paper's network (6 layers, width 512, 8 heads, FFN 2048, a 267,744-word
tied output layer; random weights, fp32, batch 1, greedy):
- flow, step mode: Flow-Attention's recurrent state (`flow_attention_step`), constant time and memory per token;
- flow, recomputed: the whole sequence through the network for every token (what a plain causal model does);
- softmax, KV cache: softmax attention with its keys and values cached (per-token time and memory grow with the
  context).
Each variant first reads the context (its prefill time is reported too), then draws `--new-tokens` tokens (the
recomputing one `--recompute-tokens`, it is slow); one untimed token warms up. The ratios compare the variants
measured in the same run. Results go to `<out>/generation.{json,md}` (default results/bench/).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from experiments.provenance import git_sha, package_versions, utc_now
from flowformer.models.transformer_lm import TransformerLM
from results.atomic_io import write_text_atomic
from tasks.wikitext103.generation import next_tokens

PAPER_VOCAB = 267_744
VARIANTS = {  # name -> (attention node, generation mode)
    "flow_step": ({"name": "flow", "clamp": 5.0}, "incremental"),
    "flow_recompute": ({"name": "flow", "clamp": 5.0}, "recompute"),
    "softmax_cache": ({"name": "softmax"}, "incremental"),
}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_variant(model: TransformerLM, mode: str, context: torch.Tensor, n_tokens: int) -> dict[str, float]:
    """Prefill seconds, tokens per second over `n_tokens` drawn tokens, and the decoding state's bytes."""
    device = context.device
    _synchronize(device)
    started = time.perf_counter()
    if mode == "incremental":
        hidden, state = model.extend(context)
    else:
        hidden, state = model(context), None
    _synchronize(device)
    prefill = time.perf_counter() - started
    tokens = torch.cat([context, next_tokens(model.logits(hidden[:, -1]), temperature=0.0)[:, None]], dim=1)

    def draw() -> None:
        nonlocal tokens, state
        if mode == "incremental":
            hidden, state = model.extend(tokens[:, -1:], state)
        else:
            hidden = model(tokens)
        tokens = torch.cat([tokens, next_tokens(model.logits(hidden[:, -1]), temperature=0.0)[:, None]], dim=1)

    draw()  # warm-up
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(n_tokens):
        draw()
    _synchronize(device)
    seconds = time.perf_counter() - started
    return {"prefill_s": prefill, "tokens": n_tokens, "seconds": seconds, "tokens_per_s": n_tokens / seconds,
            "state_bytes": state.nbytes() if state is not None else 0}


def run(contexts: Sequence[int], new_tokens: int, recompute_tokens: int, vocab_size: int, device: str,
        seed: int = 0) -> dict[str, Any]:  # fmt: skip
    models = {}
    for name, (attention, _) in VARIANTS.items():
        torch.manual_seed(seed)
        models[name] = TransformerLM(vocab_size, attention=attention).to(device).eval()
    rows = []
    for length in contexts:
        context = torch.randint(4, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed)).to(device)
        row: dict[str, Any] = {"context": length}
        for name, (_, mode) in VARIANTS.items():
            n = recompute_tokens if mode == "recompute" else new_tokens
            row[name] = time_variant(models[name], mode, context, n)
            print(f"context {length:>6}  {name:<15} {row[name]['tokens_per_s']:9.2f} tokens/s  "
                  f"(prefill {row[name]['prefill_s']:.2f} s)", flush=True)
        row["step_vs_softmax_cache"] = row["flow_step"]["tokens_per_s"] / row["softmax_cache"]["tokens_per_s"]
        row["step_vs_recompute"] = row["flow_step"]["tokens_per_s"] / row["flow_recompute"]["tokens_per_s"]
        rows.append(row)
    return {
        "rows": rows,
        "settings": {"contexts": list(contexts), "new_tokens": new_tokens, "recompute_tokens": recompute_tokens,
                     "vocab_size": vocab_size, "device": device, "dtype": "float32", "batch": 1,
                     "model": "transformer_lm 6x512, 8 heads, FFN 2048", "threads": torch.get_num_threads()},
        "machine": platform.processor() or platform.machine(),
        "git_sha": git_sha(),
        "versions": package_versions(),
        "date": utc_now(),
    }


def markdown(result: dict[str, Any], command: str) -> str:
    table = [
        [row["context"], f"{row['flow_step']['tokens_per_s']:.2f}", f"{row['flow_recompute']['tokens_per_s']:.3f}",
         f"{row['softmax_cache']['tokens_per_s']:.2f}", f"{row['step_vs_recompute']:.1f}x",
         f"{row['step_vs_softmax_cache']:.2f}x", f"{row['flow_step']['state_bytes'] / 2**20:.2f}",
         f"{row['softmax_cache']['state_bytes'] / 2**20:.1f}"]
        for row in result["rows"]
    ]
    headers = ["context", "flow step (tok/s)", "flow recomputed (tok/s)", "softmax KV cache (tok/s)",
               "step / recomputed", "step / softmax cache", "flow state (MiB)", "KV cache (MiB)"]
    settings = result["settings"]
    return (
        "# Generation speed of the WikiText-103 model\n\n"
        f"`{command}` on {settings['device']} ({result['machine']}, {settings['threads']} threads), "
        f"commit {result['git_sha']}, {result['date']}.\n\n"
        f"{settings['model']}, a {settings['vocab_size']:,}-word output layer, random weights, {settings['dtype']}, "
        f"batch 1, greedy; tokens per second over one timed run of {settings['new_tokens']} tokens "
        f"({settings['recompute_tokens']} when recomputing) after reading the context, prefill excluded. The "
        "ratios compare variants of this run.\n\n" + tabulate(table, headers=headers, tablefmt="github") + "\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.generation_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--recompute-tokens", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=PAPER_VOCAB)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument("--quick", action="store_true", help="a short check: contexts 64 256, 4 tokens, small vocab; "
                                                            "prints only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.contexts, args.new_tokens, args.recompute_tokens, args.vocab_size = [64, 256], 4, 1, 1024
    result = run(args.contexts, args.new_tokens, args.recompute_tokens, args.vocab_size, args.device)
    command = "python -m experiments.generation_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    report = markdown(result, command.strip())
    print(report)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out / "generation.json", json.dumps(result, indent=1) + "\n")
        write_text_atomic(args.out / "generation.md", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
