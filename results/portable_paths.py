"""Paths in run records that mean the same on every machine.

A record written on one machine is read on others (committed under `results/runs`, copied off a cluster), so it
names no absolute path of the machine that ran it. A path below a known root is written relative to it, with the
root's name in front, the way a shell writes it:

- ``$RUNS_DIR/<...>``: below the runs root (`RUNS_DIR`, `paths.runs_dir`);
- ``$DATA_DIR/<...>``: below the data root (`DATA_DIR`, `paths.data_dir`);
- ``<package>:<...>``: a file shipped inside an installed package (aeon's bundled UEA datasets), by package and name.

Relative paths are kept (they already travel), and so is an absolute path below none of the roots (a dataset given
by an absolute `data.data_dir` elsewhere).
"""
from __future__ import annotations

import site
import sysconfig
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from results import roots


def _package_roots() -> list[Path]:
    """The folders installed packages live in (site-packages of this environment and the user's)."""
    candidates = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages(),
                  site.getusersitepackages()}
    return sorted((Path(p).resolve() for p in candidates if p), key=lambda p: -len(p.parts))


class PathPortability:
    """Rewrites absolute paths under the runs root, the data root and the installed packages (see the module doc)."""

    def __init__(self, runs_dir: str | Path, data_dir: str | Path) -> None:
        # The longer root first: a runs root inside the data root (or the reverse) keeps its own name.
        roots = [("$RUNS_DIR", Path(runs_dir).resolve()), ("$DATA_DIR", Path(data_dir).resolve())]
        self.roots = sorted(roots, key=lambda item: -len(item[1].parts))
        self.package_roots = _package_roots()

    def path(self, text: str) -> str:
        """`text` rewritten when it is an absolute path below a known root (relative paths already travel)."""
        if not text.startswith("/") or "\n" in text:
            return text
        resolved = Path(text).resolve()
        for name, root in self.roots:
            if resolved == root:
                return name
            if resolved.is_relative_to(root):
                return f"{name}/{resolved.relative_to(root).as_posix()}"
        for root in self.package_roots:
            if resolved.is_relative_to(root):
                package, *rest = resolved.relative_to(root).parts
                return f"{package}:{'/'.join(rest)}"
        return text

    def rewrite(self, value: Any) -> Any:
        """`value` (nested dicts, lists and strings, as in a record) with every path string rewritten."""
        return map_strings(value, self.path)


def map_strings(value: Any, function: Callable[[str], str]) -> Any:
    """`value` (nested dicts, lists and strings, as in a record) with `function` applied to every string; tuples
    come back as lists, as JSON holds them."""
    if isinstance(value, str):
        return function(value)
    if isinstance(value, Mapping):
        return {key: map_strings(item, function) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [map_strings(item, function) for item in value]
    return value


def absolute_paths(value: Any, where: str = "record") -> list[str]:
    """Every string in `value` that is an absolute path, with where it was found (for tests and checks)."""
    if isinstance(value, str):
        return [f"{where}: {value}"] if value.startswith("/") or (len(value) > 2 and value[1:3] == ":\\") else []
    if isinstance(value, Mapping):
        return [hit for key, item in value.items() for hit in absolute_paths(item, f"{where}.{key}")]
    if isinstance(value, list | tuple):
        return [hit for i, item in enumerate(value) for hit in absolute_paths(item, f"{where}[{i}]")]
    return []


def local_path(text: str) -> str:
    """A portable path as a path on this machine: the roots from the environment (RUNS_DIR, DATA_DIR, or their
    defaults), a package's file from where the package is installed here. Other strings are returned as they are."""
    for variable in roots.ROOTS:
        name = f"${variable}"
        if text == name or text.startswith(f"{name}/"):
            return roots.root(variable) + text[len(name):]
    package, sep, rest = text.partition(":")
    if sep and package.isidentifier() and "/" in rest and not rest.startswith("/"):
        import importlib.util

        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            return str(Path(next(iter(spec.submodule_search_locations))) / rest)
    return text


def local_paths(value: Any) -> Any:
    """`value` (nested dicts, lists and strings, as in a record) with every portable path made local."""
    return map_strings(value, local_path)
