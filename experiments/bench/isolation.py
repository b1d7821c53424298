"""Each configuration in a fresh process, with the standard library's `multiprocessing`.

One variant's heap, caches and thread pool must never help or hurt another, so every configuration runs in its
own process. By default ("forkserver") a server process imports torch and the attention modules once, before any
torch op, and forks one child per configuration: importing torch costs seconds, more than most measurements, and a
child forked before any op has no thread pool or CUDA context to inherit. "spawn" starts a new interpreter each time
(seconds slower per configuration). The settings of `WORKER_ENV` are in the environment of every child alike.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

from experiments.bench.measure import measure

# Recorded with every run, and the same for every variant: glibc's allocator keeps freed memory in the heap (no mmap
# for big blocks, no trimming); otherwise every large temporary is handed back to the kernel and faulted in again
# page by page, which favours whichever variant happens to allocate less often. Threads keep torch's defaults.
WORKER_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}
# Imported once by the fork server; each child inherits them.
PRELOAD = ["torch", "flowformer.attention", "flowformer.attention.reference", "experiments.bench.measure"]
METHODS = ("forkserver", "spawn")


def _child(target: Callable[[dict[str, Any]], dict[str, Any]], config: dict[str, Any], connection) -> None:
    """The body of a child process: measure, and send the record (or the error) back."""
    try:
        reply = {"record": target(config)}
    except BaseException as error:  # noqa: BLE001  (reported to the runner, which records it)
        reply = {"error": f"{type(error).__name__}: {error}"[:500]}
    connection.send(reply)
    connection.close()


class Isolation:
    """Runs `target(config)` (default: `measure`) in a fresh child process per call; `run` returns the record, or
    one with `error`. `target` must be a module-level function (the child imports it); `preload` lists the modules
    the fork server imports once."""

    def __init__(self, method: str = "forkserver", target: Callable[[dict[str, Any]], dict[str, Any]] = measure,
                 preload: list[str] = PRELOAD) -> None:
        if method not in METHODS:
            raise ValueError(f"isolation must be one of {METHODS}, got {method!r}")
        # the fork server (or each spawned interpreter) takes the environment as it is when it starts
        os.environ.update(WORKER_ENV)
        self.target = target
        self.context = multiprocessing.get_context(method)
        if method == "forkserver":
            self.context.set_forkserver_preload(preload)

    def run(self, config: dict[str, Any], timeout: float) -> dict[str, Any]:
        start = time.perf_counter()
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(target=_child, args=(self.target, config, sender), daemon=True)
        process.start()
        sender.close()
        reply = None
        try:
            if receiver.poll(timeout):
                reply = receiver.recv()
        except EOFError:  # the child died before it could answer
            pass
        finally:
            receiver.close()
            if reply is None and process.is_alive():
                process.kill()
            process.join()
        wall = time.perf_counter() - start
        if reply is None:
            reason = f"timeout after {timeout:.0f} s" if wall >= timeout else _exit_reason(process.exitcode)
            return {**config, "error": reason, "wall_s": wall}
        if "error" in reply:
            return {**config, "error": reply["error"], "wall_s": wall}
        return {**config, **reply["record"], "wall_s": wall}


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
    return f"exit code {code}"
