"""Atomic file writes: a reader never sees a half-written metrics.json, checkpoint, table or figure."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process's file-creation mask: read from /proc on Linux (nothing changes), elsewhere by setting it and
    putting it back (which another thread creating a file at that instant could see)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it replaces ``path`` with ``os.replace``.

    The temporary file keeps ``path``'s suffix so that writers that pick a format from the suffix
    (matplotlib's ``savefig``) still work. The published file gets the mode a plain ``open`` would give it
    (0666 less the umask): ``mkstemp`` creates it private (0600), and colleagues on shared storage must be able to
    read each other's runs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~umask())
        # flush the data to disk before the rename publishes it, so a crash cannot leave an empty file behind
        with open(tmp_path, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically (values JSON cannot hold are written as str)."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=str))
