"""Evaluation as `fairseq-eval-lm --tokens-per-sample T --context-window C`: the windows, every token scored once,
and the perplexity equal to a plain full-context computation where the context fits."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowformer.models.transformer_lm import TransformerLM
from tasks.wikitext103.data import WikiTextDataModule
from tasks.wikitext103.dictionary import EOS
from tasks.wikitext103.module import LanguageModelModule
from tasks.wikitext103.windows import IGNORE_INDEX, ContextWindows, TokenStream
from tests.fixtures.wikitext103 import write_corpus

OBJECTIVE = {"monitor": "val/loss", "mode": "min", "primary": "ppl", "label": "perplexity", "scale": 1}


def fairseq_windows(stream: list[int], tokens_per_sample: int, context_window: int):
    """fairseq's TokenBlockDataset (blocks of T − C targets, sources shifted right from </s>) followed by
    LMContextWindowDataset's collater, which carries the previous C source tokens across windows; written out
    independently. Yields (input tokens, targets with None on context positions)."""
    block = tokens_per_sample - context_window
    source_stream = [EOS, *stream[:-1]]
    previous: list[int] = []
    for start in range(0, len(stream), block):
        source, target = source_stream[start : start + block], stream[start : start + block]
        extra = len(previous) + len(source) - tokens_per_sample
        if extra > 0:
            previous = previous[extra:]
        yield previous + source, [None] * len(previous) + target
        previous = (previous + source)[-context_window:]


@pytest.mark.parametrize("n, T, C", [(1000, 512, 400), (1000, 64, 48), (50, 64, 48), (113, 16, 15), (37, 8, 0)])
def test_windows_are_fairseqs_and_score_every_token_once(n, T, C):
    stream = np.random.default_rng(n).integers(4, 100, size=n).astype(np.uint32)
    windows = ContextWindows(TokenStream(array=stream), T, C)
    scored = []
    reference = list(fairseq_windows(stream.tolist(), T, C)) if C else None
    for k in range(len(windows)):
        item = windows[k]
        assert len(item["input"]) <= T
        targets = [t for t in item["target"].tolist() if t != IGNORE_INDEX]
        scored += targets
        if reference is not None:
            inputs, fairseq_targets = reference[k]
            assert item["input"].tolist() == inputs
            assert item["target"].tolist() == [IGNORE_INDEX if t is None else t for t in fairseq_targets]
    assert scored == stream.tolist()  # every token, once, in order
    assert reference is None or len(reference) == len(windows)


def tiny_lm(vocab_size: int, attention: str, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    options = {"name": attention, "clamp": 5.0} if attention == "flow" else {"name": attention}
    return TransformerLM(vocab_size, d_model=16, n_layers=2, n_heads=2, d_ff=32, attention=options, dropout=0.0)


def run_test_stage(datamodule: WikiTextDataModule, model: TransformerLM, precision: str = "32-true",
                   **module_options) -> dict[str, float]:  # fmt: skip
    module = LanguageModelModule(model, lambda params: torch.optim.SGD(params, lr=0.0), OBJECTIVE, **module_options)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, precision=precision)
    return trainer.test(module, datamodule=datamodule, verbose=False)[0]


def full_context_loss(model: TransformerLM, stream: np.ndarray) -> float:
    """Mean NLL of the whole split in one forward pass: input </s> x_0 .. x_{N-2}, targets x_0 .. x_{N-1}."""
    tokens = torch.from_numpy(np.concatenate([[EOS], stream[:-1]]).astype(np.int64))[None]
    with torch.no_grad():
        logits = model.logits(model.eval()(tokens))[0]
    return F.cross_entropy(logits, torch.from_numpy(stream.astype(np.int64))).item()


@pytest.mark.parametrize("attention", ["flow", "softmax"])
def test_context_window_perplexity_equals_full_context_when_it_fits(tmp_path, attention):
    write_corpus(tmp_path, "tiny-wiki")  # valid 161 and test 176 tokens
    datamodule = WikiTextDataModule("tiny-wiki", tmp_path, tokens_per_sample=256, context_window=200, batch_size=2,
                                    eval_batch_size=2)
    datamodule.setup()
    model = tiny_lm(datamodule.model_dims()["vocab_size"], attention)
    metrics = run_test_stage(datamodule, model)
    for split in ("valid", "test"):
        stream = np.asarray(datamodule.corpus.streams[split])
        assert metrics[f"{split}/tokens"] == len(stream)
        expected = full_context_loss(model, stream)
        assert metrics[f"{split}/loss"] == pytest.approx(expected, rel=1e-5)
        assert metrics[f"{split}/ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
        assert metrics[f"{split}/tokens_per_s"] > 0


def test_short_windows_score_every_token_with_fairseqs_context(tmp_path):
    write_corpus(tmp_path, "tiny-wiki")
    datamodule = WikiTextDataModule("tiny-wiki", tmp_path, tokens_per_sample=32, context_window=24, batch_size=3)
    datamodule.setup()
    model = tiny_lm(datamodule.model_dims()["vocab_size"], "flow").eval()
    metrics = run_test_stage(datamodule, model)
    stream = np.asarray(datamodule.corpus.streams["test"])
    total = 0.0
    with torch.no_grad():
        for inputs, targets in fairseq_windows(stream.tolist(), 32, 24):
            logits = model.logits(model(torch.tensor([inputs])))[0]
            scored = [i for i, t in enumerate(targets) if t is not None]
            total += F.cross_entropy(logits[scored], torch.tensor([targets[i] for i in scored]), reduction="sum").item()
    assert metrics["test/tokens"] == len(stream) > 32
    assert metrics["test/loss"] == pytest.approx(total / len(stream), rel=1e-5)
    assert metrics["test/loss"] != pytest.approx(full_context_loss(model, stream), rel=1e-4)  # context was cut


def test_evaluation_under_ddp_never_repeats_a_window(tmp_path):
    write_corpus(tmp_path, "tiny-wiki")
    datamodule = WikiTextDataModule("tiny-wiki", tmp_path, tokens_per_sample=32, context_window=16, batch_size=2)
    datamodule.setup()
    seen = []
    for rank in range(3):
        datamodule.trainer = SimpleNamespace(world_size=3, global_rank=rank)
        for loader in datamodule.test_dataloader()[1:]:  # the test split
            for batch in loader:
                seen += [t for t in batch["target"].flatten().tolist() if t != IGNORE_INDEX]
    assert sorted(seen) == sorted(np.asarray(datamodule.corpus.streams["test"]).tolist())


@pytest.mark.parametrize("fp32_eval", [True, False])
def test_test_stage_scores_in_fp32_under_a_bf16_mixed_trainer(tmp_path, fp32_eval):
    """trainer=gpu trains in bf16-mixed; the reported perplexities are still computed in fp32 (module.fp32_eval)."""
    write_corpus(tmp_path, "tiny-wiki")
    datamodule = WikiTextDataModule("tiny-wiki", tmp_path, tokens_per_sample=32, context_window=16, batch_size=4)
    datamodule.setup()
    model = tiny_lm(datamodule.model_dims()["vocab_size"], "flow")
    seen = set()
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.register_forward_hook(lambda _, __, out: seen.add((out.dtype, torch.is_autocast_enabled("cpu"))))
    mixed = run_test_stage(datamodule, model, precision="bf16-mixed", fp32_eval=fp32_eval)
    full = run_test_stage(datamodule, model, precision="32-true")
    if fp32_eval:  # autocast is switched off around every test step: the same numbers as an fp32 trainer
        assert {dtype for dtype, _ in seen} == {torch.float32} and not any(on for _, on in seen)
        scores = lambda metrics: {key: value for key, value in metrics.items() if not key.endswith("tokens_per_s")}
        assert scores(mixed) == scores(full)
    else:  # the trainer's precision, whose rounding shows in the perplexity
        assert (torch.bfloat16, True) in seen
        assert mixed["test/loss"] != full["test/loss"]
        assert mixed["test/loss"] == pytest.approx(full["test/loss"], rel=2e-2)
