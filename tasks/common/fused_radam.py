"""`FusedRAdam`: torch's RAdam update, run through torch's fused Adam kernel where `fused=True`.

torch ships RAdam without a fused kernel: its multi-tensor form makes about ten passes over every weight-sized tensor
per step (the moments, their bias corrections, the square root, the rectified step), which is memory-bound work on a
CPU and a dozen kernel launches per tensor group on a GPU. Once the rectification is on, the RAdam step is an Adam
step with two scalars changed:

    RAdam:  p -= lr · r_t · (m / b1) · sqrt(b2) / (sqrt(v) + eps)
    Adam:   p -= lr' · (m / b1) / (sqrt(v) / sqrt(b2) + eps')

with b1, b2 the bias corrections and r_t the rectification factor: lr' = lr · r_t and eps' = eps / sqrt(b2) make them
the same function, so the fused kernel (one pass over each tensor, on CPUs and GPUs) computes RAdam up to float
rounding. The first steps, where RAdam's variance estimate is not yet trusted (rho_t <= 5) and the update is plain
momentum, and what the kernel does not take (complex weights), run torch's own RAdam code. Decoupled weight decay
scales the weights by 1 - lr · weight_decay with the unrectified lr, as torch does, before the kernel runs.

The state (`step`, `exp_avg`, `exp_avg_sq`) is torch's RAdam state, so checkpoints move between the two classes;
`tests/test_fused_radam.py` holds this class to `torch.optim.RAdam`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer
from torch.optim.radam import radam

_MOMENTUM_ONLY_RHO = 5.0  # torch's RAdam applies the rectified adaptive step only where rho_t exceeds this


def rectification(step: int, beta2: float) -> float | None:
    """RAdam's rectification factor r_t after `step` steps, or None where the step is momentum only (rho_t <= 5)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    bias_correction2 = 1.0 - beta2**step
    rho_t = rho_inf - 2.0 * step * beta2**step / bias_correction2
    if rho_t <= _MOMENTUM_ONLY_RHO:
        return None
    return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))


class FusedRAdam(torch.optim.RAdam):
    """`torch.optim.RAdam` (same arguments, state and defaults) with `fused`: True runs the update through torch's
    fused Adam kernel (CPU and CUDA); None or False is torch's RAdam."""

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, decoupled_weight_decay: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable)
        if fused:
            for group in self.param_groups:
                unsupported = [key for key in ("foreach", "differentiable", "capturable") if group[key]]
                if unsupported or isinstance(group["lr"], Tensor):
                    raise ValueError(f"FusedRAdam: fused=True does not take {unsupported or ['a tensor lr']}; "
                                     "leave fused unset to run torch's RAdam")
        for group in self.param_groups:
            group.setdefault("fused", fused)
        self.defaults["fused"] = fused

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("fused", None)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if not any(group["fused"] for group in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["fused"]:
                self._fused_group_step(group)
            else:
                self._reference_step(group, *self._group_state(group))
        return loss

    def _group_state(self, group: dict[str, Any]) -> tuple[list[Tensor], ...]:
        tensors: tuple[list[Tensor], ...] = ([], [], [], [], [])  # params, grads, exp_avgs, exp_avg_sqs, steps
        has_complex = self._init_group(group, *tensors)
        return (*tensors, has_complex)  # type: ignore[return-value]

    def _fused_group_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps, has_complex = self._group_state(group)
        if has_complex:
            self._reference_step(group, params, grads, exp_avgs, exp_avg_sqs, steps, has_complex)
            return
        # weights stepped a different number of times (a weight without a gradient is not stepped) rectify apart
        by_step: dict[int, list[int]] = {}
        for index, step in enumerate(steps):
            by_step.setdefault(int(step.item()) + 1, []).append(index)
        for step, indices in by_step.items():
            subset = [[tensors[i] for i in indices] for tensors in (params, grads, exp_avgs, exp_avg_sqs, steps)]
            rect = rectification(step, group["betas"][1])
            if rect is None:
                self._reference_step(group, *subset, False)
            else:
                torch._foreach_add_(subset[4], 1)
                self._fused_adam(group, *subset[:4], step, rect)

    @staticmethod
    def _fused_adam(group: dict[str, Any], params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                    exp_avg_sqs: list[Tensor], step: int, rect: float) -> None:
        """The rectified RAdam step of tensors that all took `step` steps, as Adam's fused kernel with lr · r_t and
        eps / sqrt(b2)."""
        beta1, beta2 = group["betas"]
        weight_decay = group["weight_decay"]
        if weight_decay and group["decoupled_weight_decay"]:
            torch._foreach_mul_(params, 1.0 - group["lr"] * weight_decay)
            weight_decay = 0.0
        grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs])
        for (device, _), ((device_params, device_grads, device_avgs, device_sqs), _) in grouped.items():
            # the kernel reads the step count per tensor, on the tensors' device
            device_steps = [torch.full((), float(step), dtype=torch.float32, device=device)] * len(device_params)
            torch._fused_adam_(
                device_params, device_grads, device_avgs, device_sqs, [], device_steps,
                lr=group["lr"] * rect, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                eps=group["eps"] / math.sqrt(1.0 - beta2**step), amsgrad=False, maximize=group["maximize"],
            )

    @staticmethod
    def _reference_step(group: dict[str, Any], params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        exp_avg_sqs: list[Tensor], steps: list[Tensor], has_complex: bool) -> None:
        """torch's own RAdam update (multi-tensor form) of these tensors; it counts their steps."""
        beta1, beta2 = group["betas"]
        radam(params, grads, exp_avgs, exp_avg_sqs, steps, decoupled_weight_decay=group["decoupled_weight_decay"],
              foreach=True, has_complex=has_complex, maximize=group["maximize"], beta1=beta1, beta2=beta2,
              lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"])


__all__ = ["FusedRAdam", "rectification"]
