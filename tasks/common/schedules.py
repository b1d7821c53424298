"""Learning-rate schedules written as multipliers for `torch.optim.lr_scheduler.LambdaLR`.

With `LambdaLR` stepped once per optimiser step (Lightning's ``interval: step``), optimiser step s (0-based) uses
``base_lr · lambda(s)``, where base_lr is the optimiser's lr (``module.optimizer.lr``).

`FactorSchedule`: the official LRA schedule, a product of named factors (results/paper/official_code.md §2.3):
``lr(step) = Π factors(step)`` with

* ``constant``        × base_lr
* ``linear_warmup``   × min(1, step / warmup_steps)
* ``rsqrt_decay``     ÷ √max(step, warmup_steps)
* ``rsqrt_normalized_decay`` × √warmup_steps ÷ √max(step, warmup_steps)
* ``decay_every``     × decay_factor ** (step // steps_per_decay)
* ``cosine_decay``    × max(0, ½(1 + cos(π · (max(0, (step − warmup_steps) / steps_per_cycle) mod 1))))

`step` is the 0-based optimiser step: the official loop uses lr(0) = 0 for its first update. `FactorSchedule`
returns every factor except ``constant``: the optimiser's lr *is* the constant, and the effective lr equals the
official formula. Note that with ``rsqrt_decay`` the configured lr is not the peak: the peak is
base_lr / √warmup_steps.

`InverseSqrtSchedule`: fairseq's ``inverse_sqrt`` (the WikiText-103 recipe, results/paper/official_code.md §6): a
linear warm-up from ``warmup_init_lr`` to the optimiser's lr over ``warmup_updates`` updates, then decay with the
inverse square root of the update count.
"""

from __future__ import annotations

import math

KNOWN_FACTORS = ("constant", "linear_warmup", "rsqrt_decay", "rsqrt_normalized_decay", "decay_every", "cosine_decay")


class FactorSchedule:
    """Multiplier for `LambdaLR`: the official factor product without ``constant`` (the optimiser lr supplies it).

    Args:
        factors: e.g. ``"constant * linear_warmup * rsqrt_decay"``; must contain ``constant``.
        warmup_steps: warm-up length in optimiser steps.
        steps_per_cycle: cosine period (the official Image/Pathfinder configs use the total step count).
        decay_factor, steps_per_decay: for ``decay_every``.
    """

    def __init__(
        self,
        factors: str = "constant * linear_warmup * rsqrt_decay",
        warmup_steps: int = 1000,
        steps_per_cycle: int = 100_000,
        decay_factor: float = 0.5,
        steps_per_decay: int = 20_000,
    ) -> None:
        self.factors = [name.strip() for name in factors.split("*")]
        unknown = [name for name in self.factors if name not in KNOWN_FACTORS]
        if unknown:
            raise ValueError(f"unknown lr factor(s) {unknown} in {factors!r}; known: {', '.join(KNOWN_FACTORS)}")
        if "constant" not in self.factors:
            raise ValueError(
                f"lr factors {factors!r} lack 'constant': the optimiser lr (module.optimizer.lr) multiplies every step, "
                "so the schedule must include it to equal the official formula"
            )
        if warmup_steps <= 0 and any(
            f in self.factors for f in ("linear_warmup", "rsqrt_decay", "rsqrt_normalized_decay")
        ):
            raise ValueError(f"warmup_steps must be positive for {factors!r}, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.steps_per_cycle = int(steps_per_cycle)
        self.decay_factor = float(decay_factor)
        self.steps_per_decay = int(steps_per_decay)

    def __call__(self, step: int) -> float:
        ret = 1.0
        for name in self.factors:
            if name == "linear_warmup":
                ret *= min(1.0, step / self.warmup_steps)
            elif name == "rsqrt_decay":
                ret /= math.sqrt(max(step, self.warmup_steps))
            elif name == "rsqrt_normalized_decay":
                ret *= math.sqrt(self.warmup_steps) / math.sqrt(max(step, self.warmup_steps))
            elif name == "decay_every":
                ret *= self.decay_factor ** (step // self.steps_per_decay)
            elif name == "cosine_decay":
                progress = max(0.0, (step - self.warmup_steps) / float(self.steps_per_cycle))
                ret *= max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))
            # "constant" is the optimiser's lr
        return ret

    def learning_rate(self, base_lr: float, step: int) -> float:
        """The official lr at `step` for the given base lr (for logs and docs)."""
        return base_lr * self(step)

    def __repr__(self) -> str:
        return (
            f"FactorSchedule({' * '.join(self.factors)!r}, warmup_steps={self.warmup_steps}, "
            f"steps_per_cycle={self.steps_per_cycle})"
        )


class InverseSqrtSchedule:
    """Multiplier for `LambdaLR` that reproduces fairseq's ``inverse_sqrt`` scheduler.

    fairseq sets the lr after every update from the number of updates done so far, n:
    ``warmup_init_lr + n · (peak_lr − warmup_init_lr) / warmup_updates`` while n < warmup_updates, then
    ``peak_lr · √warmup_updates / √n``. Update n (0-based) therefore runs with lr(n): the first one with
    ``warmup_init_lr``, update ``warmup_updates`` with the peak. This returns lr(n) / peak_lr.

    Args:
        peak_lr: the lr reached at the end of warm-up; must equal the optimiser's lr (the config interpolates
            ``module.optimizer.lr``), since `LambdaLR` multiplies that lr.
        warmup_updates: warm-up length in optimiser steps (fairseq ``--warmup-updates``).
        warmup_init_lr: the lr of the first update (fairseq ``--warmup-init-lr``).
    """

    def __init__(self, peak_lr: float, warmup_updates: int = 4000, warmup_init_lr: float = 1e-7) -> None:
        if peak_lr <= 0 or warmup_updates < 1 or not 0 <= warmup_init_lr <= peak_lr:
            raise ValueError(
                f"InverseSqrtSchedule needs peak_lr > 0, warmup_updates >= 1 and 0 <= warmup_init_lr <= peak_lr; got "
                f"peak_lr={peak_lr}, warmup_updates={warmup_updates}, warmup_init_lr={warmup_init_lr} "
                "(module.optimizer.lr, module.warmup_updates, module.warmup_init_lr)"
            )
        self.peak_lr, self.warmup_updates, self.warmup_init_lr = float(peak_lr), int(warmup_updates), float(warmup_init_lr)

    def learning_rate(self, step: int) -> float:
        """fairseq's lr for update `step` (0-based)."""
        if step < self.warmup_updates:
            return self.warmup_init_lr + step * (self.peak_lr - self.warmup_init_lr) / self.warmup_updates
        return self.peak_lr * math.sqrt(self.warmup_updates / step)

    def __call__(self, step: int) -> float:
        return self.learning_rate(step) / self.peak_lr

    def __repr__(self) -> str:
        return (
            f"InverseSqrtSchedule(peak_lr={self.peak_lr}, warmup_updates={self.warmup_updates}, "
            f"warmup_init_lr={self.warmup_init_lr})"
        )


__all__ = ["KNOWN_FACTORS", "FactorSchedule", "InverseSqrtSchedule"]
