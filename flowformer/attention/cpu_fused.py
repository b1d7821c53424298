"""Builds and loads the fused CPU loops of Flow-Attention (`csrc/flow_cpu.cpp`), for backend="fused".

The loops are compiled on first use with `torch.utils.cpp_extension` (about 30-60 s, then cached under
$TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions), for the vector instructions that this torch build
uses on this CPU. Building needs a C++ compiler and the Python headers. Where the build fails, `load` warns once,
naming the cause, and returns None; `flow_attention` then runs the eager passes, which compute the same function.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("csrc") / "flow_cpu.cpp"

# Compiler flags for each ATen CPU capability: the same instruction set as torch's own kernels on this machine.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

_loaded: dict[str, ModuleType | None] = {}
_failure: dict[str, str] = {}


def capability() -> str:
    """ATen's vector capability on this CPU ("AVX512", "AVX2", or "DEFAULT" for scalar-width vectors)."""
    found = torch.backends.cpu.get_cpu_capability()
    return found if found in _CAPABILITY_FLAGS else "DEFAULT"


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled module, or None (with one warning per process) where it cannot be built."""
    level = capability()
    if level not in _loaded:
        try:
            from torch.utils.cpp_extension import load as build

            _put_ninja_on_path()

            _loaded[level] = build(
                name=f"flowformer_flow_cpu_{level.lower()}",
                sources=[str(SOURCE)],
                extra_cflags=["-O3", *_CAPABILITY_FLAGS.get(level, []), f"-DCPU_CAPABILITY={level}",
                              f"-DCPU_CAPABILITY_{level}"],
                verbose=verbose,
            )
        except Exception as error:  # noqa: BLE001  (no compiler, no headers, a build error: all mean "use eager")
            _loaded[level] = None
            _failure[level] = _first_error_line(error)
            warnings.warn(
                f"flow_attention(backend='fused') could not build its CPU loops ({_failure[level]}); running the "
                "eager passes instead, which compute the same function. Building needs a C++ compiler and the "
                "Python headers; see flowformer/attention/cpu_fused.py",
                RuntimeWarning,
                stacklevel=2,
            )
    return _loaded[level]


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` package (a dependency) installs it next to the venv's
    python, which is not on PATH when that python is called by its full path."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return  # the build then fails with torch's own "Ninja is required" message, which names the fix
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _first_error_line(error: Exception) -> str:
    """The build log's first line that says "error:", where the exception carries the log (it runs to pages), else
    the exception's own text."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if "error:" in line] or [text.strip() or type(error).__name__]
    return f"{type(error).__name__}: {lines[0]}"


def failure() -> str | None:
    """Why the last `load` on this capability returned None, or None if it did not fail (or was not tried)."""
    return _failure.get(capability())
