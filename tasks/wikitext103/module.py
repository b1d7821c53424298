"""The language-modelling LightningModule: token-level cross-entropy, exact perplexity, tokens per second.

Batches are the dicts of `tasks.wikitext103.windows.collate_windows`: `input` (B, L), `target` (B, L) with
IGNORE_INDEX on unscored positions, `padding_mask` (B, L) when the batch is ragged, and the number of scored targets
counted on the host.

Metrics (loss in nats per token; perplexity = exp(loss), which equals fairseq's 2 ** (loss in bits)):
- training: `train/loss` (the mean over the batch's tokens), `train/tokens_per_s`;
- each evaluation during training: `val/loss`, `val/ppl`, `val/tokens` (scored tokens) and `val/tokens_per_s`,
  summed over the whole split (exact also under DDP: the datamodule's evaluation samplers never repeat a window);
- testing (the best checkpoint): the same four for every split the datamodule evaluates, under the split's name:
  `valid/ppl`, `test/ppl`, `valid/tokens`, `test/tokens`, ...

The optimiser is a Hydra partial (fairseq's Adam is AdamW: decoupled weight decay); the schedule is fairseq's
inverse_sqrt (`tasks.common.schedules.InverseSqrtSchedule`) from `warmup_init_lr` to the optimiser's lr over
`warmup_updates` optimiser steps.

Each update is the gradient of the summed NLL of the tokens its micro-batches held, divided by their number, as in
fairseq (which sums the loss over the accumulated micro-batches and divides the gradient by their `sample_size`).
Lightning divides every micro-batch's loss by `trainer.accumulate_grad_batches`, also in a group cut short by the
end of an epoch (WikiText-103: 50,404 batches, so the last group of each epoch holds 4 of 16); here each micro-batch
backpropagates its summed NLL over the fixed `micro_batch_tokens`, and before the optimiser step the gradients are
rescaled by what was actually accumulated (summed over processes under DDP). A full group of full micro-batches is
left exactly as it was.

The test stage (the reported perplexities) runs in fp32 whatever `trainer.precision` is (`fp32_eval`, fairseq's
`eval_lm` is fp32); training and the evaluations that pick the checkpoint run in the trainer's precision.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.aggregation import SumMetric

from tasks.common.full_precision import full_precision
from tasks.common.module import TaskModule
from tasks.common.objective import Objective
from tasks.common.schedules import InverseSqrtSchedule
from tasks.wikitext103.loss import DEFAULT_CHUNK_TOKENS, linear_cross_entropy
from tasks.wikitext103.windows import IGNORE_INDEX, SCORED_TOKENS

log = logging.getLogger(__name__)
# fairseq's --max-tokens in the paper's command (4 samples of 512): the default scale of a micro-batch's loss
DEFAULT_MICRO_BATCH_TOKENS = 2048


class SplitScore(nn.Module):
    """Summed NLL, scored tokens and model time of one split's evaluation; reduced across processes on compute."""

    def __init__(self) -> None:
        super().__init__()
        self.sums = MetricCollection({"nll": SumMetric(), "tokens": SumMetric()})
        self.sums.set_dtype(torch.float64)  # 10^8 summed losses need more than fp32's 7 digits
        self.seconds = 0.0

    def update(self, nll: Tensor, tokens: Tensor) -> None:
        """Add a batch: its summed NLL and scored tokens (scalar tensors). The evaluation's time goes to `seconds`."""
        self.sums["nll"].update(nll.double())
        self.sums["tokens"].update(tokens.double())

    def metrics(self) -> dict[str, float]:
        """loss (nats/token), ppl, tokens and tokens_per_s, then a reset for the next evaluation."""
        sums = {name: float(value) for name, value in self.sums.compute().items()}
        self.sums.reset()
        seconds, self.seconds = self.seconds, 0.0
        loss = sums["nll"] / max(sums["tokens"], 1.0)
        ppl = math.exp(loss) if loss < 700 else math.inf  # a diverged model reports inf, not an OverflowError
        return {"loss": loss, "ppl": ppl, "tokens": sums["tokens"],
                "tokens_per_s": sums["tokens"] / seconds if seconds > 0 else 0.0}


def scored_tokens(batch: dict[str, Any], count: Tensor | None = None) -> int:
    """The scored tokens of a batch: the host's count where the batch carries it, else `count` (or the targets)
    read back from the device."""
    if SCORED_TOKENS in batch:
        return int(batch[SCORED_TOKENS])
    return int(count if count is not None else (batch["target"] != IGNORE_INDEX).sum())


class LanguageModelModule(TaskModule):
    """Causal LM training and fairseq-exact evaluation (see the module docstring).

    Args:
        eval_splits: names of the test loaders, in the datamodule's order (`module_dims()`).
        warmup_updates, warmup_init_lr: fairseq's inverse_sqrt warm-up (paper: 6000 updates from 1e-7).
        loss_chunk_tokens: tokens per chunk of the output layer's cross-entropy (memory, not results).
        fp32_eval: score the test stage in fp32 under a mixed-precision trainer (`module.fp32_eval`; default True,
            as fairseq's eval_lm); False scores it in the trainer's precision.
        micro_batch_tokens: the tokens of a full training micro-batch (from the datamodule, `module_dims()`): each
            micro-batch backpropagates its summed NLL divided by it. It sets only the scale of the loss handed to
            Lightning (what loss scaling sees); every update is divided by the tokens it really accumulated.
        (model, optimizer, objective: see `TaskModule`; the model returns hidden states and has `output_weight`.)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        objective: Mapping[str, Any] | Objective,
        eval_splits: Sequence[str] = ("valid", "test"),
        warmup_updates: int = 4000,
        warmup_init_lr: float = 1e-7,
        loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        fp32_eval: bool = True,
        micro_batch_tokens: int = DEFAULT_MICRO_BATCH_TOKENS,
    ) -> None:
        super().__init__(model, optimizer, objective, scheduler=None, scheduler_interval="step")
        if micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
        self.eval_splits = tuple(eval_splits)
        self.warmup_updates, self.warmup_init_lr = int(warmup_updates), float(warmup_init_lr)
        self.loss_chunk_tokens = int(loss_chunk_tokens)
        self.fp32_eval = bool(fp32_eval)
        self.micro_batch_tokens = int(micro_batch_tokens)
        self._group_tokens = 0  # scored tokens of the micro-batches accumulated since the last optimiser step
        self.scores = nn.ModuleDict({name: SplitScore() for name in ("val", *self.eval_splits)})
        self._train_tokens, self._train_seconds = 0, 0.0
        self._batch_started: float | None = None
        self._scoring: tuple[str, float] | None = None  # the split being evaluated and when its first batch came

    # ------------------------------------------------------------------------------------------------ the loss
    def nll(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(summed NLL over the scored targets, their number) for a batch."""
        hidden = self.model(batch["input"], padding_mask=batch.get("padding_mask"))
        return linear_cross_entropy(hidden, self.model.output_weight, batch["target"],
                                    chunk_tokens=self.loss_chunk_tokens)

    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        """Training: the summed NLL over `micro_batch_tokens` (see the module docstring), after logging the mean
        `train/loss`. Otherwise the mean NLL per scored token."""
        nll, count = self.nll(batch)
        tokens = scored_tokens(batch, count)
        mean = nll / max(tokens, 1)
        if stage != "train":
            return mean
        self.log("train/loss", mean, on_step=True, on_epoch=True, prog_bar=True, batch_size=tokens)
        self._group_tokens += tokens
        return nll / self.micro_batch_tokens

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the accumulated gradient by the tokens it holds (fairseq's sample_size), not by the group size
        Lightning assumes: Lightning backpropagated Σ nll / (micro_batch_tokens · accumulate_grad_batches) per
        process and DDP averaged over processes."""
        accumulated, self._group_tokens = self._group_tokens, 0
        trainer = self.trainer
        if trainer.world_size > 1:
            total = torch.tensor(accumulated, dtype=torch.int64, device=self.device)
            accumulated = int(trainer.strategy.reduce(total, reduce_op="sum").item())
        assumed = self.micro_batch_tokens * trainer.accumulate_grad_batches * trainer.world_size
        if accumulated in (0, assumed):  # nothing scored, or exactly what Lightning assumed: leave the bits alone
            return
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(assumed / accumulated)

    # ---------------------------------------------------------------------------------------------- training
    def _train_clock(self, running: bool) -> float:
        """Add the time since the clock last (re)started to the training time; restart it or stop it. Returns the
        training time so far. The clock reads the host's time without waiting for the GPU: the host runs at most a
        queue of kernels ahead of it, so over many batches the rate is the GPU's."""
        now = time.perf_counter()
        if self._batch_started is not None:
            self._train_seconds += now - self._batch_started
        self._batch_started = now if running else None
        return self._train_seconds

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._train_clock(running=True)

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._train_tokens += scored_tokens(batch)
        # the mean since the start of this fit (evaluations excluded), steadier than one batch's rate
        self.log("train/tokens_per_s", self._train_tokens / max(self._train_clock(running=True), 1e-9), on_step=True,
                 on_epoch=False, prog_bar=True)

    def on_validation_start(self) -> None:
        self._train_clock(running=False)

    def on_train_epoch_end(self) -> None:
        self._train_clock(running=False)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -------------------------------------------------------------------------------------------- evaluation
    def _score(self, batch: dict[str, Tensor], name: str) -> None:
        if self._scoring is None or self._scoring[0] != name:  # the first batch of this split's evaluation
            self._score_clock(None)
            self._scoring = (name, time.perf_counter())
        nll, count = self.nll(batch)
        self.scores[name].update(nll, count)

    def _score_clock(self, name: str | None) -> None:
        """Stop the running evaluation clock (that of split `name` only, when given) and add its time to its split:
        one wait for the GPU per split's evaluation, not one per batch."""
        if self._scoring is None or name not in (None, self._scoring[0]):
            return
        self._synchronize()
        running, started = self._scoring
        self.scores[running].seconds += time.perf_counter() - started
        self._scoring = None

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._score(batch, "val")

    def on_test_start(self) -> None:
        weights = {p.dtype for p in self.parameters()}
        if self.fp32_eval and weights != {torch.float32}:
            log.warning("module.fp32_eval: the weights are %s (trainer.precision=%s), so the test stage cannot run in "
                        "fp32; use a mixed precision (bf16-mixed, 16-mixed) or 32-true for a reported perplexity",
                        sorted(map(str, weights)), self.trainer.precision)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        # the reported perplexities: fp32 also under a mixed-precision trainer, as fairseq's eval_lm scores them
        with full_precision(self.device, self.fp32_eval):
            self._score(batch, self.eval_splits[dataloader_idx])

    def _log_split(self, name: str) -> None:
        self._score_clock(name)
        for key, value in self.scores[name].metrics().items():
            # fp64, so that metrics.json keeps every digit of sums over 10^5 tokens (Lightning keeps the dtype)
            self.log(f"{name}/{key}", torch.tensor(value, dtype=torch.float64), sync_dist=False,
                     add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        self._log_split("val")
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        for name in self.eval_splits:
            self._log_split(name)

    # ------------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        optimizer = self.build_optimizer(self.parameters())
        peak = optimizer.param_groups[0]["lr"]
        schedule = InverseSqrtSchedule(peak, self.warmup_updates, self.warmup_init_lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


__all__ = ["DEFAULT_MICRO_BATCH_TOKENS", "LanguageModelModule", "SplitScore"]
