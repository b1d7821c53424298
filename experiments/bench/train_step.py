"""The training step that `python -m experiments.train_speed` times: each domain's paper model on synthetic batches
of the data's shapes, with the recipe's optimiser, clipping and precision, measured in the process that runs it.

Scales: `paper` (the paper's shapes and per-device batch), `quick` (the paper's shapes, small batches: minutes on a
CPU), `tiny` (toy widths and shapes: every code path in seconds, for tests).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Model overrides of the `tiny` scale: every code path of the paper model at toy widths, for tests.
TINY_MODEL = {
    "uea": ["model.d_model=16", "model.n_heads=2", "model.d_ff=32", "model.n_layers=1"],
    "lra": ["model.d_model=16", "model.n_heads=2", "model.qkv_dim=16", "model.mlp_dim=32", "model.n_layers=1"],
    "imagenet": ["model.dims=[16,32]", "model.depths=[1,1]", "model.heads=2"],
    "wikitext103": ["model.d_model=16", "model.n_heads=2", "model.d_ff=32", "model.n_layers=1"],
    "d4rl": ["model.d_model=16", "model.n_heads=2", "model.d_ff=32", "model.n_layers=1"],
}
SCALES = ("paper", "quick", "tiny")


@dataclass(frozen=True)
class Workload:
    """One domain's paper model on synthetic data of its shapes.

    `shapes` maps each scale (paper, quick, tiny) to the batch and data sizes it trains on; `dims` are the model's
    data-dependent arguments (what the datamodule's `model_dims()` gives)."""

    name: str
    experiment: str
    task: str
    dims: dict[str, Any]
    shapes: dict[str, dict[str, Any]]
    notes: str = ""
    overrides: tuple[str, ...] = field(default=())
    scale_notes: dict[str, str] = field(default_factory=dict)  # what one scale changes, e.g. {"quick": "..."}

    def notes_at(self, scale: str) -> str:
        """The notes that hold at `scale`: the workload's own, then the scale's."""
        return " ".join(note for note in (self.notes, self.scale_notes.get(scale, "")) if note)


WORKLOADS: dict[str, Workload] = {
    workload.name: workload for workload in (
        Workload("uea", "uea/JapaneseVowels", "uea", {"feat_dim": 12, "num_classes": 9, "max_len": 29},
                 {"paper": {"batch": 16}, "quick": {"batch": 16}, "tiny": {"batch": 4}}),
        Workload("lra_text", "lra/text", "lra", {"vocab_size": 257, "num_classes": 2, "max_len": 1000},
                 {"paper": {"batch": 32}, "quick": {"batch": 4}, "tiny": {"batch": 2, "length": 64}}),
        Workload("lra_listops", "lra/listops", "lra", {"vocab_size": 20, "num_classes": 10, "max_len": 2000},
                 {"paper": {"batch": 32}, "quick": {"batch": 2}, "tiny": {"batch": 2, "length": 64}}),
        Workload("lra_retrieval", "lra/retrieval", "lra", {"vocab_size": 257, "num_classes": 2, "max_len": 4000},
                 {"paper": {"batch": 32}, "quick": {"batch": 2}, "tiny": {"batch": 2, "length": 64}},
                 "two documents per example"),
        Workload("lra_image", "lra/image", "lra", {"vocab_size": 256, "num_classes": 10, "max_len": 1024},
                 {"paper": {"batch": 256}, "quick": {"batch": 8}, "tiny": {"batch": 2, "length": 64}}),
        Workload("lra_pathfinder", "lra/pathfinder", "lra", {"vocab_size": 256, "num_classes": 2, "max_len": 1024},
                 {"paper": {"batch": 512}, "quick": {"batch": 8}, "tiny": {"batch": 2, "length": 64}}),
        Workload("imagenet", "imagenet/hierarchical", "imagenet", {"num_classes": 1000, "image_size": 224},
                 {"paper": {"batch": 128}, "quick": {"batch": 4}, "tiny": {"batch": 2, "image_size": 32}}),
        Workload("wikitext103", "wikitext103/transformer_lm", "wikitext103", {"vocab_size": 267744, "padding_idx": 1},
                 {"paper": {"batch": 4, "length": 512}, "quick": {"batch": 1, "length": 512, "vocab_size": 33278},
                  "tiny": {"batch": 2, "length": 32, "vocab_size": 64}},
                 scale_notes={"quick": "WikiText-2's 33,278 words instead of WikiText-103's 267,744 (the output "
                                       "layer's share)"}),
        Workload("d4rl", "d4rl/hopper-medium", "d4rl",
                 {"state_dim": 11, "act_dim": 3, "max_action": 1.0, "context_length": 20, "max_timestep": 1000},
                 {"paper": {"batch": 64}, "quick": {"batch": 64}, "tiny": {"batch": 4}}),
    )
}
QUICK_WORKLOADS = ("uea", "lra_text", "imagenet", "wikitext103", "d4rl")


# ------------------------------------------------------------------------------------------------ building


def compose(workload: Workload, attention: str, scale: str) -> Any:
    """The experiment's config with `model/attention=<attention>` (tiny: toy widths)."""
    from results.recipe import expected_config

    overrides = [f"experiment={workload.experiment}", f"model/attention={attention}", *workload.overrides]
    if scale == "tiny":
        overrides += TINY_MODEL[workload.task]
    from omegaconf import OmegaConf

    return OmegaConf.create(expected_config(overrides))


def model_dims(workload: Workload, scale: str) -> dict[str, Any]:
    shape = workload.shapes[scale]
    dims = dict(workload.dims)
    for key in ("vocab_size", "image_size"):
        if key in shape:
            dims[key] = shape[key]
    if "length" in shape and "max_len" in dims:
        dims["max_len"] = shape["length"]
    return dims


def make_batch(workload: Workload, scale: str, device: str, seed: int = 0) -> dict[str, Any]:
    """A synthetic training batch of the workload's shapes (padding where the real data has it)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    shape, dims = workload.shapes[scale], model_dims(workload, scale)
    batch = shape["batch"]

    def integers(high: int, *size: int) -> torch.Tensor:
        return torch.randint(0, high, size, generator=generator)

    def right_padding(length: int, shortest: int) -> torch.Tensor:  # (B, L) True = padding, lengths in [shortest, L]
        lengths = integers(length - shortest + 1, batch) + shortest
        return torch.arange(length)[None, :] >= lengths[:, None]

    if workload.task == "uea":
        length = dims["max_len"]
        tensors = {"x": torch.randn(batch, length, dims["feat_dim"], generator=generator),
                   "padding_mask": right_padding(length, length // 4), "target": integers(dims["num_classes"], batch)}
    elif workload.task == "lra":
        length = dims["max_len"]
        fixed = workload.name in ("lra_image", "lra_pathfinder")  # images fill every position
        keys = ("tokens1", "tokens2") if workload.name == "lra_retrieval" else ("tokens",)
        tensors = {"target": integers(dims["num_classes"], batch)}
        for key in keys:
            tensors[key] = integers(dims["vocab_size"] - 1, batch, length) + (0 if fixed else 1)
            if not fixed:
                mask = right_padding(length, length // 2)
                tensors[key] = tensors[key].masked_fill(mask, 0)
                tensors[key.replace("tokens", "padding_mask")] = mask
    elif workload.task == "imagenet":
        size = dims["image_size"]
        tensors = {"x": torch.randn(batch, 3, size, size, generator=generator),
                   "target": integers(dims["num_classes"], batch)}
    elif workload.task == "wikitext103":
        length = shape["length"]
        tokens = integers(dims["vocab_size"] - 4, batch, length + 1) + 4
        tensors = {"input": tokens[:, :-1], "target": tokens[:, 1:]}
    elif workload.task == "d4rl":
        k = dims["context_length"]
        tensors = {"states": torch.randn(batch, k, dims["state_dim"], generator=generator),
                   "actions": torch.rand(batch, k, dims["act_dim"], generator=generator) * 2 - 1,
                   "returns_to_go": torch.rand(batch, k, generator=generator),
                   "timesteps": integers(dims["max_timestep"] - k, batch)[:, None] + torch.arange(k),
                   "padding_mask": right_padding(k, 1).flip(-1)}  # left padding, as short episodes start
    else:
        raise ValueError(f"unknown task {workload.task!r}")
    return {key: value.to(device) for key, value in tensors.items()}


def loss_function(workload: Workload) -> Callable[[Any, dict[str, Any]], Any]:
    """loss(model, batch): the domain's training loss (mean over the batch)."""
    import torch.nn.functional as F

    if workload.task == "wikitext103":
        from tasks.wikitext103.loss import linear_cross_entropy

        def lm_loss(model, batch):
            nll, count = linear_cross_entropy(model(batch["input"]), model.output_weight, batch["target"])
            return nll / count

        return lm_loss
    if workload.task == "d4rl":
        from tasks.d4rl.module import MODEL_INPUTS

        # the masked mean of tasks.d4rl.module.masked_action_error, written without boolean indexing, whose
        # data-dependent shape would break the compiled graph that the compile tests inspect
        def action_loss(model, batch):
            inputs = {key: batch[key] for key in MODEL_INPUTS}
            error = (model(**inputs) - batch["actions"]).square().mean(-1)
            real = (~batch["padding_mask"]).to(error.dtype)
            return (error * real).sum() / real.sum()

        return action_loss

    def classification_loss(model, batch):
        return F.cross_entropy(model(**{key: value for key, value in batch.items() if key != "target"}),
                               batch["target"])

    return classification_loss


def build(workload: Workload, attention: str, scale: str, device: str) -> tuple[Any, Any, Any]:
    """(model, optimizer, cfg) of the workload: the experiment's model and optimiser on `device`."""
    import torch
    from hydra.utils import instantiate

    from tasks.common.module import fastest_optimizer

    cfg = compose(workload, attention, scale)
    torch.manual_seed(0)
    model = instantiate(cfg.model, **model_dims(workload, scale), _convert_="all").to(device)
    factory = instantiate(cfg.module.optimizer)
    takes_model = getattr(factory, "func", None).__name__ == "create_optimizer_v2"
    optimizer = fastest_optimizer(factory, torch.device(device))(model if takes_model else model.parameters())
    return model, optimizer, cfg


# --------------------------------------------------------------------------------------------- measuring


def train_step_function(workload: Workload, model: Any, optimizer: Any, cfg: Any, precision: str,
                        device: str) -> Callable[[dict[str, Any]], None]:
    """One optimiser step on a batch, as the trainer runs it: autocast, loss scaling (16-mixed), clipping."""
    import torch

    loss_of = loss_function(workload)
    clip = cfg.trainer.get("gradient_clip_val")
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device) if precision == "16-mixed" else None

    def step(batch: dict[str, Any]) -> None:
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_of(model, batch)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    return step


def linear_products_function(workload: Workload, model: Any, batch: dict[str, Any], precision: str,
                             device: str) -> Callable[[dict[str, Any]], None]:
    """The matrix products of the model's linear layers alone, at the shapes one training step gives them: per
    layer the forward product and the two of the backward (input and weight gradients), in the step's matmul
    dtype. The floor that everything else in a step adds to."""
    import torch

    shapes: list[tuple[int, int, int]] = []  # (rows, in, out) per linear layer call

    def record(module: Any, inputs: tuple, _output: Any) -> None:
        shapes.append((inputs[0].numel() // inputs[0].shape[-1], module.in_features, module.out_features))

    hooks = [module.register_forward_hook(record) for module in model.modules() if isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        loss_function(workload)(model, batch)
    for hook in hooks:
        hook.remove()
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision, torch.float32)
    operands = [(torch.randn(rows, n_in, device=device, dtype=dtype), torch.randn(n_out, n_in, device=device, dtype=dtype),
                 torch.randn(rows, n_out, device=device, dtype=dtype)) for rows, n_in, n_out in shapes]

    def products(_batch: dict[str, Any]) -> None:
        for x, weight, grad in operands:
            torch.mm(x, weight.t())
            torch.mm(grad, weight)
            torch.mm(grad.t(), x)

    return products


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process; returns its record (see the module docstring)."""
    import torch

    from experiments.bench.measure import MemoryProbe
    from flowformer.compile import compile_model
    from tasks.common.host_memory import keep_freed_host_memory_for

    device, workload = config["device"], WORKLOADS[config["workload"]]
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    keep_freed_host_memory_for(device)  # as a training run does (tasks.common.module.TaskModule.setup)
    model, optimizer, cfg = build(workload, config["attention"], config["scale"], device)
    model.train()
    batch = make_batch(workload, config["scale"], device)
    if config["mode"] == "compiled":
        compile_model(model)
    if config["mode"] == "matmul":
        step = linear_products_function(workload, model, batch, config["precision"], device)
    else:
        step = train_step_function(workload, model, optimizer, cfg, config["precision"], device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    for _ in range(config["warmup"]):
        step(batch)
    sync()
    warmup_s = time.perf_counter() - started
    probe = MemoryProbe(device)
    times = []
    for _ in range(config["steps"]):
        started = time.perf_counter()
        step(batch)
        sync()
        times.append(time.perf_counter() - started)
    peak = probe.peak_bytes() + probe.baseline
    median = statistics.median(times)
    return {
        "step_ms": median * 1e3,
        "steps_per_s": 1.0 / median,
        "times_ms": [t * 1e3 for t in times],
        "warmup_s": warmup_s,
        "peak_mib": peak / 2**20,
        "memory_method": probe.method + (" (absolute)" if device == "cuda" else " (absolute RSS)"),
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": workload.shapes[config["scale"]]["batch"],
        "threads": torch.get_num_threads(),
        "optimizer": f"{type(optimizer).__name__}"
                     + "".join(f" {k}" for k in ("fused", "foreach") if optimizer.defaults.get(k)),
    }


