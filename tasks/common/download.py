"""Download a dataset's files, check them and remember them: the one implementation behind every `make data-<domain>`.

A domain declares each file it downloads as a `Source`: the file's name, its addresses (mirrors first to last) and
what the file must be. `fetch(source, folder, command)` then:

* downloads it over HTTP(S) with a progress bar into `<file>.part`. A download cut short keeps its part, and the next
  run resumes it with a Range request (a server that ignores the range sends the whole file, which replaces the part);
* checks the size and hashes published for the file (its publisher's MD5 or SHA-256, or those a well-known dataset
  registry records) before the file gets its real name; a download that fails these checks is deleted;
* writes the file's SHA-256 beside it, `<file>.sha256`, in `sha256sum`'s format (so `sha256sum -c` reads it). For a
  file whose hash nobody publishes, this hash recorded at the first download is the reference: a later download must
  match it, and a later run checks the file on disk against it (`fetch` on a file already there, `verify_record`).

A size or hash that differs raises `ChecksumError`, naming the file, the expected and found values, and what to do.
A file that no address could deliver raises `DownloadError`, an OSError.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from results.atomic_io import write_text_atomic

BLOCK = 1 << 20  # bytes read at a time when hashing
# bytes read at a time from the network: a connection that breaks loses the block being read, the rest stays in the part
NETWORK_BLOCK = 1 << 16
TIMEOUT_S = 60
HEADERS = {
    "User-Agent": "flowformer-suite (make data)",
    # the bytes as stored: a server compressing the transfer would make them differ from the published size and hash
    "Accept-Encoding": "identity",
}


class DownloadError(OSError):
    """No address of a file could deliver it (network or server error); a partial download is kept to resume."""


class ChecksumError(ValueError):
    """A file's size or hash is not the expected one."""


@dataclass(frozen=True)
class Source:
    """One file to download.

    file: its name on disk. urls: its addresses, tried in order while the network fails.
    size (bytes), sha256, md5: the values published for it, None where there are none; `origin` says who publishes
    them, for messages. Without a hash, the SHA-256 recorded at the first download is the reference.
    """

    file: str
    urls: tuple[str, ...]
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    origin: str = "published"


def record_path(path: Path) -> Path:
    """`<path>.sha256`, where the SHA-256 of `path` is recorded."""
    return Path(path).with_name(Path(path).name + ".sha256")


def read_record(path: Path) -> str | None:
    """The SHA-256 recorded for `path`, or None when there is no record."""
    record = record_path(path)
    if not record.is_file():
        return None
    fields = record.read_text(encoding="utf-8").split()
    return fields[0].lower() if fields else None


def digests(path: Path, algorithms: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """{algorithm: hex digest} of the file at `path`, read once."""
    hashes = {name: hashlib.new(name, usedforsecurity=False) for name in algorithms}
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            for digest in hashes.values():
                digest.update(block)
    return {name: digest.hexdigest() for name, digest in hashes.items()}


def record_hash(path: Path, sha256: str | None = None) -> str:
    """Write `<path>.sha256` (computing the hash unless given) and return the hash."""
    path = Path(path)
    sha256 = sha256 or digests(path)["sha256"]
    # atomically, through a temporary file of its own: the processes of a DDP run may all record the same file
    write_text_atomic(record_path(path), f"{sha256}  {path.name}\n")
    return sha256


def verify_record(path: Path, command: str) -> None:
    """Check the file at `path` against the SHA-256 recorded beside it (nothing to check where there is no record).

    Raises ChecksumError naming the file, both hashes and the fix (`command` fetches it again)."""
    if read_record(path) is not None:
        _check(Path(path), Path(path), None, command, url=None)


def fetch(source: Source, folder: Path, command: str) -> Path:
    """`folder/<source.file>`: downloaded unless it is there, checked either way, its SHA-256 recorded beside it.

    A file already there (downloaded before, or placed by hand) is checked against the published values and its
    record. `command` is what the user runs to fetch it again (e.g. `make data-lra`); messages name it.
    Raises ChecksumError on a mismatch, DownloadError when no address delivered the file.
    """
    folder = Path(folder)
    path = folder / source.file
    if path.is_file():
        sha256 = _check(path, path, source, command, url=None)
        if read_record(path) is None:
            record_hash(path, sha256)
        return path
    folder.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    failures = []
    for url in source.urls:
        try:
            _download(url, part)
        except DownloadError as error:
            failures.append(str(error))
            continue
        try:
            sha256 = _check(part, path, source, command, url=url)
        except ChecksumError:
            part.unlink()
            raise
        os.replace(part, path)
        record_hash(path, sha256)
        return path
    raise DownloadError("; ".join(failures))


def _download(url: str, part: Path) -> None:
    """Append the rest of `url` to `part` (all of it when the part is empty or the server ignores the range)."""
    import requests

    offset = part.stat().st_size if part.is_file() else 0
    headers = dict(HEADERS, **({"Range": f"bytes={offset}-"} if offset else {}))
    print(f"{'resuming' if offset else 'downloading'} {url} into {part}", file=sys.stderr)
    total = None
    try:
        with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as response:
            if offset and response.status_code == 416:
                return  # the part already holds everything the server has; the checks judge it
            response.raise_for_status()
            if response.status_code != 206:
                offset = 0
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            name = part.name.removesuffix(".part")
            with open(part, "ab" if offset else "wb") as out, _progress(name, total, offset) as advance:
                for block in response.iter_content(NETWORK_BLOCK):
                    out.write(block)
                    advance(len(block))
    except requests.exceptions.ChunkedEncodingError as error:  # the body ended before its announced length
        raise DownloadError(f"{url}: the connection broke before the end of the file{_kept(part)}") from error
    except requests.RequestException as error:
        raise DownloadError(f"{url}: {error}{_kept(part)}") from error
    received = part.stat().st_size
    if total is not None and received != total:
        raise DownloadError(f"{url}: the connection closed after {received:,} of {total:,} bytes{_kept(part)}")


def _kept(part: Path) -> str:
    if part.is_file() and part.stat().st_size:
        return f" ({part.stat().st_size:,} bytes kept in {part}; the next run resumes from there)"
    return ""


@contextmanager
def _progress(name: str, total: int | None, done: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr for one transfer; yields the function that advances it by n bytes."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(name, total=total, completed=done)
        yield lambda n: progress.advance(task, n)


def _check(data: Path, path: Path, source: Source | None, command: str, url: str | None) -> str:
    """Check the bytes in `data` (the file `path`, or its fresh download from `url`) against the values `source`
    publishes and the hash recorded for `path`. Returns their SHA-256; raises ChecksumError."""
    record = record_path(path)
    recorded = read_record(path)
    size = data.stat().st_size
    if source is not None and source.size is not None and size != source.size:
        advice = _advice(path, command, url, None)
        raise ChecksumError(_message(path, "size", f"{size:,} bytes", f"{source.size:,} bytes", source.origin, advice))
    found = digests(data, ("sha256", "md5") if source is not None and source.md5 else ("sha256",))
    expected = []
    if source is not None and source.md5:
        expected.append(("MD5", "md5", source.md5, source.origin, None))
    if source is not None and source.sha256:
        expected.append(("SHA-256", "sha256", source.sha256, source.origin, None))
    if recorded is not None:
        expected.append(("SHA-256", "sha256", recorded, f"recorded in {record} at its first download", record))
    for what, algorithm, want, origin, from_record in expected:
        if found[algorithm] != want.lower():
            advice = _advice(path, command, url, from_record)
            raise ChecksumError(_message(path, what, found[algorithm], want.lower(), origin, advice))
    return found["sha256"]


def _message(path: Path, what: str, found: str, expected: str, origin: str, advice: str) -> str:
    return f"{path}: {what} is {found}, expected {expected} ({origin}). {advice}"


def _advice(path: Path, command: str, url: str | None, record: Path | None) -> str:
    """What to do about a mismatch: of a fresh download from `url` (deleted), or of the file on disk (url None);
    `record` is set when the reference that failed is the recorded hash."""
    if url is None:
        advice = f"Delete {path} and run `{command}` to download it again"
        return advice + (f", or delete {record} if you replaced the file on purpose." if record else ".")
    advice = f"The download was deleted; run `{command}` to download it again. If the same value comes back, "
    if record:
        return advice + f"the file at {url} has changed since the first download: delete {record} to accept it."
    return advice + f"the file at {url} is not the one expected: check it with its publisher before using it."
