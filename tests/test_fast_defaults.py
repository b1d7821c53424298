"""Defaults that make training faster without changing what it computes: the fastest optimiser implementation of
the same update, and no host synchronisation per step on an accelerator."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from timm.optim import create_optimizer_v2

from tasks.common.classification import ClassificationModule
from tasks.common.module import NonFiniteLossError, fast_optimizer_options

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
OBJECTIVE = {"monitor": "val/acc", "mode": "max", "primary": "acc", "label": "accuracy", "scale": 100}


def test_the_fused_kernel_where_the_optimiser_has_one_else_foreach():
    adamw = functools.partial(torch.optim.AdamW, lr=1e-3)
    assert fast_optimizer_options(adamw, CPU) == fast_optimizer_options(adamw, CUDA) == {"fused": True}
    assert fast_optimizer_options(adamw, MPS) == {"foreach": True}  # no fused kernel there
    assert fast_optimizer_options(functools.partial(torch.optim.RAdam, lr=1e-3), CPU) == {"foreach": True}
    # timm's factory builds torch's AdamW for opt="adamw" and passes `fused` on to it
    timm_adamw = functools.partial(create_optimizer_v2, opt="adamw", weight_decay=0.05)
    assert fast_optimizer_options(timm_adamw, CPU) == {"fused": True}
    optimizer = timm_adamw(torch.nn.Linear(3, 3), lr=1e-3, **fast_optimizer_options(timm_adamw, CPU))
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]
    assert fast_optimizer_options(functools.partial(create_optimizer_v2, opt="lamb"), CPU) == {"foreach": True}
    # a config that chooses keeps its choice
    assert fast_optimizer_options(functools.partial(torch.optim.AdamW, foreach=False), CUDA) == {}


def test_the_fast_implementation_computes_the_same_update():
    torch.manual_seed(0)
    start = [torch.randn(40, 30), torch.randn(30)]
    gradients = [[torch.randn_like(p) for p in start] for _ in range(8)]

    def train(**options):
        params = [p.clone().requires_grad_() for p in start]
        optimizer = torch.optim.AdamW(params, lr=1e-2, **options)
        for grads in gradients:
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
        return params

    for plain, fast in zip(train(foreach=False), train(**fast_optimizer_options(torch.optim.AdamW, CPU))):
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)  # float rounding only


def test_on_an_accelerator_a_non_finite_loss_is_caught_without_a_sync_per_step():
    module = ClassificationModule(torch.nn.Linear(2, 3), functools.partial(torch.optim.SGD, lr=0.1), OBJECTIVE, 3)
    trainer = types.SimpleNamespace(log_every_n_steps=10, global_step=0, current_epoch=0)
    module._trainer = trainer
    for step, value in enumerate([1.0, 2.0, float("nan"), 3.0]):
        trainer.global_step = step
        module._watch_loss(torch.tensor(value))  # between logging steps nothing is read back
    # before any checkpoint (and at the next logging step) the device's note is read, naming the first bad step
    with pytest.raises(NonFiniteLossError, match=r"first at global step 2 .*resume=true"):
        module.on_save_checkpoint({})


def test_the_first_non_finite_loss_is_named_by_its_optimiser_step_under_gradient_accumulation():
    module = ClassificationModule(torch.nn.Linear(2, 3), functools.partial(torch.optim.SGD, lr=0.1), OBJECTIVE, 3)
    trainer = types.SimpleNamespace(log_every_n_steps=10, global_step=0, current_epoch=0)
    module._trainer = trainer
    # two micro-batches per optimiser step: the fifth loss belongs to global step 2
    for micro_batch, value in enumerate([1.0, 2.0, 3.0, 4.0, float("nan"), 5.0]):
        trainer.global_step = micro_batch // 2
        module._watch_loss(torch.tensor(value))
    with pytest.raises(NonFiniteLossError, match=r"first at global step 2 "):
        module.on_save_checkpoint({})


def test_loaders_pin_memory_only_for_a_cuda_device():
    from tasks.common.datamodule import TaskDataModule

    datamodule = TaskDataModule()
    assert not datamodule.pin_memory(True)  # no trainer yet
    for device, pinned in (("cpu", False), ("cuda", True)):
        datamodule.trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device(device)))
        assert datamodule.pin_memory(True) is pinned and not datamodule.pin_memory(False)


def test_vision_models_go_channels_last_on_a_gpu_only():
    from tasks.imagenet.module import ImageNetModule

    def module_on(device: str) -> ImageNetModule:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 2, stride=2), torch.nn.Flatten(), torch.nn.Linear(64, 3))
        module = ImageNetModule(model, functools.partial(torch.optim.SGD, lr=0.1), OBJECTIVE, 3, None, lr=0.1,
                                warmup_epochs=0, batch_size=2, image_size=8, top_k=(1,))
        module._trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device(device)))
        module.setup("fit")
        return module

    channels_last = torch.channels_last
    assert module_on("cuda").model[0].weight.is_contiguous(memory_format=channels_last)
    cpu_weight = module_on("cpu").model[0].weight
    assert cpu_weight.is_contiguous() and not cpu_weight.is_contiguous(memory_format=channels_last)


def test_the_gpu_trainer_lets_cudnn_pick_kernels_outside_the_recipe():
    from omegaconf import OmegaConf

    from results.recipe import science_config
    from tests.helpers import compose_config

    gpu = compose_config(["experiment=imagenet/hierarchical", "trainer=gpu", "trainer.precision=bf16-mixed"])
    assert gpu.trainer.benchmark is True
    assert "trainer.benchmark" not in science_config(OmegaConf.to_container(gpu, resolve=True))


def test_under_mixed_precision_with_clipping_torchs_fused_optimisers_are_not_used():
    # Lightning refuses to clip gradients that a fused optimiser would unscale itself
    module = ClassificationModule(torch.nn.Linear(2, 3), functools.partial(torch.optim.AdamW, lr=0.1), OBJECTIVE, 3)
    for clip, precision, fused in ((None, "bf16-mixed", True), (1.0, "32-true", True), (1.0, "bf16-mixed", False)):
        module._trainer = types.SimpleNamespace(gradient_clip_val=clip, precision=precision)
        optimizer = module.build_optimizer(module.parameters())
        assert bool(optimizer.defaults.get("fused")) is fused and bool(optimizer.defaults.get("foreach")) is not fused
    # fused RAdam takes the gradients Lightning unscaled and clipped, like any optimiser: fused under every precision
    module.optimizer_factory = functools.partial(torch.optim.RAdam, lr=0.1)
    optimizer = module.build_optimizer(module.parameters())
    assert type(optimizer).__name__ == "FusedRAdam" and optimizer.defaults["fused"]
    assert not getattr(optimizer, "_step_supports_amp_scaling", False)


MAPPED_BLOCKS = """
import ctypes, sys, torch
if sys.argv[1] == "keep":
    from tasks.common.host_memory import keep_freed_host_memory
    assert keep_freed_host_memory()
class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                "fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo
before = libc.mallinfo2().hblks
block = torch.empty(6 * 1024 * 1024)  # 24 MiB, larger than any block importing torch frees
print(libc.mallinfo2().hblks - before)
"""


def _glibc_version() -> tuple[int, ...]:
    library, version = platform.libc_ver()
    return tuple(int(part) for part in version.split(".")) if library == "glibc" and version else ()


@pytest.mark.skipif(_glibc_version() < (2, 33), reason="glibc's malloc settings, read back with mallinfo2 (glibc 2.33+)")
def test_cpu_runs_take_large_blocks_from_the_heap_where_freed_memory_is_reused():
    # glibc maps a block this large on its own and unmaps it when freed (so the next step faults its pages in
    # again); once `keep_freed_host_memory` has run, it comes from the heap, whose freed memory is kept
    def mapped_blocks(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", MAPPED_BLOCKS, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1])
        return int(run.stdout.split()[-1])

    assert mapped_blocks("default") == 1
    assert mapped_blocks("keep") == 0


def test_the_module_keeps_freed_host_memory_on_a_cpu_run_only(monkeypatch):
    calls = []
    monkeypatch.setattr("tasks.common.host_memory.keep_freed_host_memory", lambda: calls.append(True))
    module = ClassificationModule(torch.nn.Linear(2, 3), functools.partial(torch.optim.SGD, lr=0.1), OBJECTIVE, 3)
    for device, expected in (("cuda", []), ("cpu", [True])):
        module._trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device(device)))
        module.setup("fit")
        assert calls == expected
