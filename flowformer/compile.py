"""`torch.compile` for the suite's models: `compile_model(model)` compiles a model's forward in place.

- In place (`nn.Module.compile`): the parameters keep their names, so checkpoints of a compiled run load into an
  eager model and back.
- Flow-Attention's hand-written passes are custom ops (`flowformer.attention.flow.ops`): one node of the graph per
  attention call, with no graph break, and their backward is the hand-written one.
- Random ops run as in eager mode (inductor's `fallback_random`): dropout draws the masks an eager run draws, from
  the same generator, so a compiled run computes the eager run's function up to float rounding. Compiling changes
  the speed of a run, never its recipe.
- Shapes: the first input shape compiles a static graph; a second shape recompiles once with the dimension that
  changed made dynamic, and that graph serves every later size (a loader's last, smaller batch; the shrinking
  batches of D4RL's rollouts). Compiled graphs are cached on disk, so a second run compiles in seconds.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The package whose code runs inside the flow custom ops: a cached graph holds the shapes and strides of their
# outputs, so a change to it must not reuse graphs compiled before it. The whole package is hashed, so that a new
# module the ops come to import is covered without a list to keep.
_OP_PACKAGE = Path(__file__).resolve().parent / "attention" / "flow"


@functools.cache
def op_source_tag() -> str:
    """A short hash of the flow ops' source, added to torch.compile's cache key (read once per process)."""
    digest = hashlib.sha256()
    for path in sorted(_OP_PACKAGE.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return f"flowformer-{digest.hexdigest()[:12]}"


def configure_compiler() -> None:
    """The process-wide compiler settings `compile_model` relies on (see the module docstring)."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    tag = op_source_tag()
    current = torch.compiler.config.cache_key_tag
    if tag not in current:
        torch.compiler.config.cache_key_tag = f"{current}:{tag}" if current else tag


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """Compile `model`'s forward in place (`nn.Module.compile`) and return it; `options` go to `torch.compile`."""
    configure_compiler()
    model.compile(**options)
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether `compile_model` (or `nn.Module.compile`) compiled `model`'s forward."""
    return getattr(model, "_compiled_call_impl", None) is not None


__all__ = ["compile_model", "configure_compiler", "is_compiled", "op_source_tag"]
