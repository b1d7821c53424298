"""Training the language model: fairseq's gradient normalisation over accumulated micro-batches, the loaders with
worker processes, and a short run that learns."""

from __future__ import annotations

import json
import math
from collections import Counter

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from experiments.train import train
from flowformer.models.transformer_lm import TransformerLM
from tasks.wikitext103.data import WikiTextDataModule
from tasks.wikitext103.module import LanguageModelModule
from tasks.wikitext103.windows import IGNORE_INDEX, SCORED_TOKENS, ContextWindows, TokenStream, collate_windows
from tests.fixtures.wikitext103 import write_corpus, write_markov_corpus
from tests.helpers import compose_config

OBJECTIVE = {"monitor": "val/loss", "mode": "min", "primary": "ppl", "label": "perplexity", "scale": 1}


class RecordingOptimizer(torch.optim.Optimizer):
    """Keeps a copy of the gradients of every update and leaves the weights as they are."""

    def __init__(self, params, lr: float = 1.0) -> None:
        super().__init__(params, {"lr": lr})
        self.updates: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.updates.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return loss


def test_a_short_accumulation_group_is_normalised_by_its_own_tokens():
    """An update is the gradient of the summed NLL of the tokens its micro-batches held over their number (fairseq's
    sample_size), also for the group the end of the epoch cuts short, and whatever micro_batch_tokens says."""
    torch.manual_seed(0)
    vocab, length, accumulate = 24, 8, 4
    stream = TokenStream(array=np.random.default_rng(0).integers(4, vocab, size=45).astype(np.uint32))
    blocks = ContextWindows(stream, length, 0)  # 6 blocks: 5 of 8 tokens, the last of 5
    groups = [[0, 1, 2, 3], [4, 5]]  # 6 micro-batches in groups of 4: the second is cut short
    model = TransformerLM(vocab, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0,
                          attention={"name": "flow", "clamp": 5.0})  # fmt: skip
    expected = []
    for group in groups:
        model.zero_grad()
        batch = collate_windows([blocks[i] for i in group])
        hidden = model(batch["input"], padding_mask=batch.get("padding_mask"))
        logits = model.logits(hidden)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["target"].flatten()).backward()  # token mean
        expected.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()

    module = LanguageModelModule(model, lambda params: RecordingOptimizer(params), OBJECTIVE, warmup_updates=1,
                                 micro_batch_tokens=6)  # a scale unlike the real 8 tokens per micro-batch
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(blocks, batch_size=1, collate_fn=collate_windows))
    updates = trainer.optimizers[0].updates
    assert len(updates) == len(groups)
    for got, want in zip(updates, expected):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_a_batch_carries_its_count_of_scored_targets_as_a_host_int():
    ragged = [{"input": np.arange(5), "target": np.array([IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9])},
              {"input": np.arange(3), "target": np.array([IGNORE_INDEX, 4, 5])}]
    batch = collate_windows(ragged)
    assert batch[SCORED_TOKENS] == int((batch["target"] != IGNORE_INDEX).sum()) == 5
    assert type(batch[SCORED_TOKENS]) is int  # stays on the host: no read-back from the device at each step


def _same(one, other) -> bool:  # batch values: tensors, and the host's count of scored tokens (an int)
    return torch.equal(one, other) if isinstance(one, torch.Tensor) else type(one) is type(other) and one == other


def test_loaders_with_two_workers_give_the_batches_of_none(tmp_path):
    """The task's default num_workers=2 (fixtures use 0): the same batches, in the same order, every epoch."""
    write_corpus(tmp_path, "tiny-wiki")

    def batches(num_workers: int) -> dict[str, list[dict[str, torch.Tensor]]]:
        datamodule = WikiTextDataModule("tiny-wiki", tmp_path, tokens_per_sample=32, context_window=16, batch_size=3,
                                        seed=5, num_workers=num_workers)  # fmt: skip
        datamodule.setup()
        train_loader = datamodule.train_dataloader()
        out = {"train epoch 0": list(train_loader)}
        train_loader.sampler.set_epoch(1)
        out["train epoch 1"] = list(train_loader)
        out["val"] = list(datamodule.val_dataloader())
        for split, loader in zip(("valid", "test"), datamodule.test_dataloader()):
            out[f"test {split}"] = list(loader)
        return out

    serial, parallel = batches(0), batches(2)
    assert serial.keys() == parallel.keys()
    for name in serial:
        assert len(serial[name]) == len(parallel[name]) > 1, name
        for one, other in zip(serial[name], parallel[name]):
            assert one.keys() == other.keys() and all(_same(one[key], other[key]) for key in one), name
    assert not all(torch.equal(a["input"], b["input"]) for a, b in zip(serial["train epoch 0"], serial["train epoch 1"]))


def unigram_perplexity(train_tokens: list[str], tokens: list[str]) -> float:
    """Perplexity of `tokens` under the word frequencies of `train_tokens` (every word must occur there)."""
    counts = Counter(train_tokens)
    total = sum(counts.values())
    return math.exp(-sum(math.log(counts[word] / total) for word in tokens) / len(tokens))


def test_the_language_model_learns(tmp_path):
    """A short, seeded CPU run on a corpus with structure (a Markov chain over words): the validation perplexity
    falls far below the corpus's unigram perplexity, and stays above the chain's own (only a model that saw the
    tokens it predicts could beat that)."""
    data_dir = tmp_path / "data"
    chain, drawn = write_markov_corpus(data_dir, "markov")
    cached = {split: stream if stream[-1] == "</s>" else [*stream, "</s>"] for split, stream in drawn.items()}
    unigram = unigram_perplexity(cached["train"], cached["valid"])
    best_possible = math.exp(chain.nll(drawn["valid"]))
    assert unigram > 20 and best_possible < 2.5  # what the corpus offers to learn

    cfg = compose_config([
        "experiment=wikitext103/transformer_lm", f"paths.data_dir={data_dir}", "data.dataset=markov", "seed=0",
        "data.tokens_per_sample=32", "data.context_window=16", "data.batch_size=8", "data.num_workers=0",
        "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.dropout=0.0",
        "module.optimizer.lr=0.01", "module.warmup_updates=20", "trainer.accumulate_grad_batches=1",
        "trainer.max_steps=150", "trainer.val_check_interval=50", "trainer.num_sanity_val_steps=0",
        "callbacks.last_checkpoint.every_n_train_steps=50", "logger=csv", "callbacks.rich_progress_bar=null",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    ])
    train(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    first, best = record["history"][0]["val/ppl"], record["metrics"]["valid/ppl"]
    assert record["metrics"]["valid/tokens"] == len(cached["valid"])
    assert best < unigram / 5, (best, unigram)
    assert best > 0.95 * best_possible, (best, best_possible)
    assert first > best
