"""Cross-entropy over a full-vocabulary output layer without holding all the logits at once.

WikiText-103's output layer is a softmax over 267,744 words. Computed plainly, one micro-batch of 2,048 tokens makes
a (2048, 267744) fp32 logits tensor of 2.2 GB, and autograd keeps the log-probabilities and the logits' gradient
of the same size. `linear_cross_entropy` instead takes the hidden states and the output weight and works through
the tokens in chunks: each chunk's logits live only while the chunk's loss and, when gradients are wanted, its
gradients with respect to the hidden states and the weight are computed. The backward pass then only scales
those saved gradients. The arithmetic is that of the plain computation (one forward and two gradient matmuls per
chunk), so it costs no extra time; `experiments/lm_loss_memory.py` measures the memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tasks.wikitext103.windows import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 512


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """Summed negative log-likelihood of `target` under softmax(hidden @ weight.T), and the number of scored tokens.

    Args:
        hidden: (..., D) final hidden states (any leading shape).
        weight: (V, D) output embedding (tied with the input embedding in the LM).
        target: (...) int64 ids; positions equal to `ignore_index` are not scored.
        chunk_tokens: tokens per chunk; a chunk's logits take chunk_tokens × V × 4 bytes.
    Returns:
        (nll_sum, count): a scalar tensor in at least fp32 with gradients towards `hidden` and `weight`, and an int64 scalar.
        The mean loss is nll_sum / count.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens} (module.loss_chunk_tokens)")
    flat_hidden, flat_target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    nll = _ChunkedLinearCrossEntropy.apply(flat_hidden, weight, flat_target, int(chunk_tokens), ignore_index, wants_grad)
    return nll, (flat_target != ignore_index).sum()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, when asked, the gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor, chunk_tokens: int, ignore_index: int,
                wants_grad: bool) -> Tensor:
        # under autocast the matmuls run in its dtype (as a plain output layer's would); softmax and sums in fp32+
        device = hidden.device.type
        matmul_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        wide = torch.promote_types(matmul_dtype, torch.float32)
        w = weight.to(matmul_dtype)
        total = torch.zeros((), dtype=wide, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if wants_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if wants_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start : start + chunk_tokens].to(matmul_dtype)
            t = target[start : start + chunk_tokens]
            scored = t != ignore_index
            safe_t = torch.where(scored, t, 0)
            logits = (h @ w.T).to(wide)  # (n, V): the only vocabulary-sized tensor, one chunk at a time
            picked = logits.gather(1, safe_t[:, None])[:, 0]
            row_max = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # in place: no second vocabulary-sized temporary
            sums = probs.sum(dim=-1, keepdim=True)
            log_norm = row_max[:, 0] + sums[:, 0].log()
            total += ((log_norm - picked) * scored).sum()
            if wants_grad:
                # d nll / d logits = softmax - one_hot(target), zero on unscored rows
                probs.div_(sums)
                probs[torch.arange(len(t), device=t.device), safe_t] -= 1.0
                probs.mul_(scored[:, None])
                g = probs.to(matmul_dtype)
                grad_hidden[start : start + chunk_tokens] = (g @ w).to(hidden.dtype)
                if g.dtype == grad_weight.dtype:
                    grad_weight.addmm_(g.T, h)  # accumulates without a (V, D) temporary
                else:
                    grad_weight.add_(g.T @ h)
        if wants_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None, None


__all__ = ["DEFAULT_CHUNK_TOKENS", "linear_cross_entropy"]
