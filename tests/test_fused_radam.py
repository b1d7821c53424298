"""FusedRAdam against its reference, torch.optim.RAdam: the same weights and state after every step, through the
momentum-only first steps and the rectified ones, with each option the recipes can set."""

from __future__ import annotations

import functools

import pytest
import torch

from tasks.common.fused_radam import FusedRAdam, rectification
from tasks.common.module import fastest_optimizer

STEPS = 30  # rho_t passes 5 at step 6 with beta2 = 0.999, and at step 4 with beta2 = 0.99

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def train(optimizer_class, start, gradients, skipped=(), groups=None, **options):
    """The weights and optimiser state after one optimiser step per gradient list; `skipped` holds (step, index) of
    weights without a gradient at that step."""
    params = [p.clone().requires_grad_() for p in start]
    param_groups = [{"params": [params[i] for i in group], **extra} for group, extra in groups] if groups else params
    optimizer = optimizer_class(param_groups, **options)
    for step, grads in enumerate(gradients):
        for index, (param, grad) in enumerate(zip(params, grads)):
            param.grad = None if (step, index) in skipped else grad.clone()
        optimizer.step()
    return params, optimizer


def problem(device, dtype=torch.float32, steps=STEPS):
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(48, 32, generator=generator), torch.randn(32, generator=generator),
             torch.randn(7, 5, 3, generator=generator)]
    gradients = [[torch.randn(p.shape, generator=generator) for p in start] for _ in range(steps)]
    move = functools.partial(torch.Tensor.to, device=device, dtype=dtype)
    return [move(p) for p in start], [[move(g) for g in grads] for grads in gradients]


def assert_same_training(reference, fused, rtol=1e-5, atol=1e-6):
    (ref_params, ref_opt), (params, opt) = reference, fused
    for expected, actual in zip(ref_params, params):
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    for expected, actual in zip(ref_opt.state.values(), opt.state.values()):
        assert set(actual) == set(expected)
        assert actual["step"].device == expected["step"].device and actual["step"] == expected["step"]
        torch.testing.assert_close(actual["exp_avg"], expected["exp_avg"], rtol=rtol, atol=atol)
        torch.testing.assert_close(actual["exp_avg_sq"], expected["exp_avg_sq"], rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [
    {"lr": 1e-2},
    {"lr": 1e-2, "weight_decay": 0.1},
    {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True},
    {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05, "maximize": True},
], ids=["plain", "l2", "decoupled", "betas-eps-l2-maximize"])
def test_fused_radam_computes_torch_radam(device, options):
    start, gradients = problem(device)
    reference = train(torch.optim.RAdam, start, gradients, foreach=False, **options)
    assert_same_training(reference, train(FusedRAdam, start, gradients, fused=True, **options))


def test_weights_stepped_apart_and_param_groups_keep_their_own_rectification():
    # a weight without a gradient is not stepped, so its step count (and rectification) falls behind the others'
    start, gradients = problem("cpu")
    skipped = {(step, 1) for step in range(0, 12, 2)} | {(3, 0)}
    groups = [((0, 2), {}), ((1,), {"lr": 1e-3, "weight_decay": 0.05})]
    reference = train(torch.optim.RAdam, start, gradients, skipped, groups, lr=1e-2, foreach=False)
    fused = train(FusedRAdam, start, gradients, skipped, groups, lr=1e-2, fused=True)
    assert_same_training(reference, fused)
    assert len({int(state["step"]) for state in fused[1].state.values()}) == 3


def test_bfloat16_weights_follow_the_reference_to_bfloat16_rounding():
    start, gradients = problem("cpu", torch.bfloat16, steps=10)
    reference = train(torch.optim.RAdam, start, gradients, lr=1e-2, foreach=False)
    assert_same_training(reference, train(FusedRAdam, start, gradients, lr=1e-2, fused=True), rtol=2e-2, atol=2e-2)


def test_the_first_steps_are_momentum_only_and_the_rest_rectified():
    assert [rectification(step, 0.999) is None for step in range(1, 8)] == [True] * 5 + [False] * 2
    # r_t rises towards 1 as the variance estimate firms up
    assert 0 < rectification(6, 0.999) < rectification(100, 0.999) < rectification(2000, 0.999) < 1


def test_checkpoints_move_between_torch_radam_and_fused_radam():
    start, gradients = problem("cpu")
    params, optimizer = train(FusedRAdam, start, gradients[:10], lr=1e-2, fused=True)
    # a fused run resumed by torch's class, and the other way round, go on as an uninterrupted reference run
    for source, target, options in ((optimizer, torch.optim.RAdam, {}), (None, FusedRAdam, {"fused": True})):
        if source is None:
            params, source = train(torch.optim.RAdam, start, gradients[:10], lr=1e-2)
        resumed = [p.detach().clone().requires_grad_() for p in params]
        resumed_optimizer = target(resumed, lr=1e-2, **options)
        resumed_optimizer.load_state_dict(source.state_dict())
        for grads in gradients[10:]:
            for param, grad in zip(resumed, grads):
                param.grad = grad.clone()
            resumed_optimizer.step()
        assert_same_training(train(torch.optim.RAdam, start, gradients, lr=1e-2, foreach=False),
                             (resumed, resumed_optimizer))


def test_fused_false_is_torch_radam_and_unsupported_options_are_refused():
    start, gradients = problem("cpu", steps=8)
    reference = train(torch.optim.RAdam, start, gradients, lr=1e-2)
    assert_same_training(reference, train(FusedRAdam, start, gradients, lr=1e-2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="foreach"):
        FusedRAdam([torch.zeros(2, requires_grad=True)], fused=True, foreach=True)
    with pytest.raises(ValueError, match="tensor lr"):
        FusedRAdam([torch.zeros(2, requires_grad=True)], lr=torch.tensor(1e-3), fused=True)


def test_the_task_module_builds_fused_radam_from_torch_radam_config():
    factory = functools.partial(torch.optim.RAdam, lr=1e-3)
    optimizer = fastest_optimizer(factory, torch.device("cpu"))([torch.zeros(2, requires_grad=True)])
    assert type(optimizer) is FusedRAdam and optimizer.defaults["fused"] and optimizer.defaults["lr"] == 1e-3
    # a config that chooses an implementation keeps torch's RAdam behaviour
    chosen = fastest_optimizer(functools.partial(torch.optim.RAdam, foreach=False), torch.device("cpu"))
    assert not chosen([torch.zeros(2, requires_grad=True)]).defaults["fused"]
    # no fused kernel on this device: the multi-tensor form
    elsewhere = fastest_optimizer(factory, torch.device("mps"))
    assert elsewhere.keywords == {"lr": 1e-3, "foreach": True}
