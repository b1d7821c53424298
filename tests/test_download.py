"""Downloads (tasks/common/download.py and the four `make data-<domain>` downloaders) against a file server on the
loopback address: a good file, a truncated one and a corrupted one, an interrupted download that resumes, and the
hash recorded at the first download checked on later use. Nothing here reaches the network."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks.common.download import (
    ChecksumError,
    DownloadError,
    Source,
    fetch,
    read_record,
    record_path,
    verify_record,
)


class FileServer:
    """Files served over HTTP on 127.0.0.1 as a dataset's host serves them: with Range requests (unless `ranges` is
    off), and with a connection that can be cut once after a number of bytes (`cut[path] = n`)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.ranges = True
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                server.answer(self)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def serve(self, path: str, body: bytes) -> str:
        """Serve `body` at `/path`; returns its URL."""
        self.files["/" + path] = body
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/{path}"

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        byte_range = handler.headers.get("Range")
        self.requests.append((handler.path, byte_range))
        body = self.files.get(handler.path)
        if body is None:
            handler.send_error(404)
            return
        start = 0
        if byte_range and self.ranges:
            start = int(byte_range.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                handler.send_response(416)
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            handler.send_response(200)
        payload = body[start:]
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        cut = self.cut.pop(handler.path, None)
        handler.wfile.write(payload if cut is None else payload[:cut])


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    files = FileServer()
    files.thread.start()
    yield files
    files.httpd.shutdown()
    files.httpd.server_close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def served(good: bytes, variant: str) -> bytes:
    """What the server sends instead of `good`: all of it, its first half, or the same size with one byte changed."""
    if variant == "truncated":
        return good[: len(good) // 2]
    if variant == "corrupted":
        middle = len(good) // 2
        return good[:middle] + bytes([good[middle] ^ 0xFF]) + good[middle + 1 :]
    return good


def assert_mismatch_message(message: str, path: Path, variant: str, good: bytes, command: str) -> None:
    """The error names the file, the expected and found values, and what to do."""
    bad = served(good, variant)
    assert str(path) in message and f"`{command}`" in message
    if variant == "truncated":
        assert f"size is {len(bad):,} bytes, expected {len(good):,} bytes" in message
    else:
        assert f"SHA-256 is {sha256(bad)}, expected {sha256(good)}" in message


GOOD = bytes(range(256)) * 257  # 65,792 bytes: more than one read block of the client, less than a megabyte


# ---------------------------------------------------------------------------------------------------------------
# tasks/common/download.py


def test_a_good_download_is_checked_and_its_hash_recorded_beside_it(server, tmp_path):
    source = Source("data.bin", (server.serve("data.bin", GOOD),), size=len(GOOD), sha256=sha256(GOOD))
    path = fetch(source, tmp_path, "make data-x")
    assert path == tmp_path / "data.bin" and path.read_bytes() == GOOD
    assert record_path(path).read_text() == f"{sha256(GOOD)}  data.bin\n"  # sha256sum's format
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "data.bin.sha256"]  # no part left
    assert fetch(source, tmp_path, "make data-x") == path and len(server.requests) == 1  # not downloaded again


@pytest.mark.parametrize("variant", ["truncated", "corrupted"])
def test_a_bad_download_is_deleted_and_the_error_names_the_file_the_values_and_the_fix(server, tmp_path, variant):
    url = server.serve("data.bin", served(GOOD, variant))
    source = Source("data.bin", (url,), size=len(GOOD), sha256=sha256(GOOD), origin="as its publisher gives it")
    with pytest.raises(ChecksumError) as error:
        fetch(source, tmp_path, "make data-x")
    assert_mismatch_message(str(error.value), tmp_path / "data.bin", variant, GOOD, "make data-x")
    assert "as its publisher gives it" in str(error.value) and url in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_published_md5_is_checked(server, tmp_path):
    md5 = hashlib.md5(GOOD).hexdigest()
    source = Source("data.bin", (server.serve("data.bin", served(GOOD, "corrupted")),), md5=md5)
    with pytest.raises(ChecksumError, match=f"MD5 is [0-9a-f]{{32}}, expected {md5}"):
        fetch(source, tmp_path, "make data-x")


def test_an_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    good = GOOD * 4
    source = Source("data.bin", (server.serve("data.bin", good),), size=len(good), sha256=sha256(good))
    server.cut["/data.bin"] = 150_000
    with pytest.raises(DownloadError, match="the next run resumes from there"):
        fetch(source, tmp_path, "make data-x")
    part = tmp_path / "data.bin.part"
    kept = part.stat().st_size  # what arrived, less the block being read when the connection broke
    assert 0 < kept <= 150_000 and part.read_bytes() == good[:kept] and not (tmp_path / "data.bin").exists()
    assert fetch(source, tmp_path, "make data-x").read_bytes() == good
    assert server.requests[-1] == ("/data.bin", f"bytes={kept}-") and not part.exists()


def test_a_server_that_ignores_the_range_sends_the_whole_file_again(server, tmp_path):
    source = Source("data.bin", (server.serve("data.bin", GOOD),), sha256=sha256(GOOD))
    (tmp_path / "data.bin.part").write_bytes(b"not the start of the file")
    server.ranges = False
    assert fetch(source, tmp_path, "make data-x").read_bytes() == GOOD


def test_the_next_mirror_is_tried_when_one_fails(server, tmp_path):
    source = Source("data.bin", (server.url("missing.bin"), server.serve("data.bin", GOOD)), sha256=sha256(GOOD))
    assert fetch(source, tmp_path, "make data-x").read_bytes() == GOOD
    with pytest.raises(DownloadError, match="404"):
        fetch(Source("other.bin", (server.url("missing.bin"),)), tmp_path, "make data-x")


def test_without_a_published_hash_the_first_download_is_recorded_and_checked_on_later_use(server, tmp_path):
    source = Source("data.bin", (server.serve("data.bin", GOOD),))
    path = fetch(source, tmp_path, "make data-x")
    assert read_record(path) == sha256(GOOD)
    verify_record(path, "make data-x")
    path.write_bytes(served(GOOD, "corrupted"))  # changed on disk after the download
    for check in (lambda: fetch(source, tmp_path, "make data-x"), lambda: verify_record(path, "make data-x")):
        with pytest.raises(ChecksumError) as error:
            check()
        message = str(error.value)
        assert_mismatch_message(message, path, "corrupted", GOOD, "make data-x")
        assert f"recorded in {record_path(path)}" in message and f"Delete {path}" in message


def test_a_new_download_must_match_the_recorded_hash(server, tmp_path):
    source = Source("data.bin", (server.serve("data.bin", GOOD),))
    fetch(source, tmp_path, "make data-x").unlink()  # e.g. an archive deleted once unpacked; its record stays
    server.serve("data.bin", served(GOOD, "corrupted"))
    with pytest.raises(ChecksumError) as error:
        fetch(source, tmp_path, "make data-x")
    assert f"has changed since the first download: delete {record_path(tmp_path / 'data.bin')}" in str(error.value)
    assert not (tmp_path / "data.bin").exists()


# ---------------------------------------------------------------------------------------------------------------
# make data-lra


def tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def serve_lra_archive(server, monkeypatch, name: str, good: bytes, body: bytes) -> None:
    """Point the LRA archive `name` at the server (which sends `body`), expecting the size and hash of `good`."""
    from tasks.lra import download

    def moved(spec):
        if spec.name != name:
            return spec
        url = server.serve(spec.source.file, body)
        source = dataclasses.replace(spec.source, urls=(url,), size=len(good), sha256=sha256(good), md5=None)
        return dataclasses.replace(spec, source=source)

    monkeypatch.setattr(download, "ARCHIVES", tuple(moved(spec) for spec in download.ARCHIVES))


@pytest.mark.parametrize("variant", ["good", "truncated", "corrupted"])
def test_lra_download(server, tmp_path, monkeypatch, capsys, variant):
    from tasks.lra import download

    names = ("test_batch", *download.lra.CIFAR_TRAIN_BATCHES)
    good = tar_gz({f"cifar-10-batches-py/{name}": b"batch" for name in names})
    serve_lra_archive(server, monkeypatch, "cifar10", good, served(good, variant))
    root = tmp_path / "lra"
    report = download.prepare(root, ("image",))
    archive = root / "downloads" / "cifar-10-python.tar.gz"
    if variant == "good":
        assert report == {"image": []}
        assert not archive.exists() and read_record(archive) == sha256(good)  # deleted once unpacked; record kept
    else:
        assert report["image"] and not archive.exists()
        assert_mismatch_message(capsys.readouterr().err, archive, variant, good, "make data-lra")


def test_lra_unpack_refuses_a_member_that_would_land_outside_the_data_folder(server, tmp_path, monkeypatch, capsys):
    from tasks.lra import download

    good = tar_gz({"cifar-10-batches-py/test_batch": b"batch", "cifar-10-batches-py/../../escaped": b"x"})
    serve_lra_archive(server, monkeypatch, "cifar10", good, good)
    report = download.prepare(tmp_path / "data" / "lra", ("image",))
    assert report["image"] and "outside the destination" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists()


# ---------------------------------------------------------------------------------------------------------------
# make data-uea


def uea_files(tmp_path: Path, name: str) -> dict[str, bytes]:
    from tests.fixtures.uea import write_uea_dataset

    paths = write_uea_dataset(tmp_path / "made", name, n_dims=2, n_classes=2, n_train=4, n_test=3, length=5)
    return {path.name: path.read_bytes() for path in paths.values()}


@pytest.mark.parametrize("variant", ["good", "truncated", "corrupted"])
def test_uea_download_from_zenodo(server, tmp_path, monkeypatch, variant):
    """Zenodo publishes each file's size and MD5 in its record; the record ids are aeon's."""
    from tasks.uea import download

    files = uea_files(tmp_path, "Toy")
    entries = [
        {
            "key": key,
            "size": len(data),
            "checksum": f"md5:{hashlib.md5(data).hexdigest()}",
            "links": {"self": server.serve(f"records/7/files/{key}", served(data, variant))},
        }
        for key, data in files.items()
    ]
    server.serve("api/records/7", json.dumps({"files": entries}).encode())
    monkeypatch.setattr(download, "ZENODO_RECORD", server.url("api/records/{record}"))
    monkeypatch.setattr(download, "zenodo_record_id", lambda name: 7)
    uea_dir = tmp_path / "uea"
    ok, status = download.prepare("Toy", uea_dir, fetchers={"Zenodo": download.fetch_zenodo})
    train = uea_dir / "Toy" / "Toy_TRAIN.ts"
    if variant == "good":
        assert ok and status == "ok (downloaded via Zenodo)"
        assert read_record(train) == sha256(files["Toy_TRAIN.ts"])
    else:
        truncated = f"size is {len(served(files['Toy_TRAIN.ts'], variant)):,} bytes"
        expected = truncated if variant == "truncated" else "MD5 is"
        assert not ok and status.startswith("INVALID (download): ") and str(train) in status and expected in status
        assert "make data-uea" in status and not train.exists()


def test_uea_zip_download_records_each_file_and_a_changed_file_is_invalid(server, tmp_path, monkeypatch):
    """timeseriesclassification.com publishes no hash: the zip's hash and the files' hashes are recorded."""
    from tasks.uea import download

    files = uea_files(tmp_path, "Toy")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for key, data in files.items():
            bundle.writestr(f"Toy/{key}", data)
    server.serve("aeon-toolkit/Toy.zip", buffer.getvalue())
    monkeypatch.setattr(download, "TSC_SITE_ZIP", server.url("aeon-toolkit/{name}.zip"))
    uea_dir = tmp_path / "uea"
    ok, status = download.prepare("Toy", uea_dir, fetchers={"site": download.fetch_tsc_site_zip})
    assert ok, status
    train = uea_dir / "Toy" / "Toy_TRAIN.ts"
    assert read_record(train) == sha256(files["Toy_TRAIN.ts"])
    assert read_record(uea_dir / "downloads" / "Toy.zip") == sha256(buffer.getvalue())
    assert not (uea_dir / "downloads" / "Toy.zip").exists()
    assert sorted(p.name for p in uea_dir.iterdir()) == ["Toy", "downloads"]  # no staging folder left
    assert download.prepare("Toy", uea_dir, offline=True) == (True, "ok (already present)")
    train.write_bytes(train.read_bytes().replace(b"@problemName Toy", b"@problemName Toy "))
    ok, status = download.prepare("Toy", uea_dir, offline=True)
    assert not ok and status.startswith(f"INVALID (already present): {train}: SHA-256 is ")
    assert f"expected {sha256(files['Toy_TRAIN.ts'])}" in status and "make data-uea" in status


# ---------------------------------------------------------------------------------------------------------------
# make data-wikitext103


def wikitext_zip(tmp_path: Path) -> bytes:
    from tests.fixtures.wikitext103 import write_corpus

    folder = write_corpus(tmp_path / "made", "wikitext-2")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for path in sorted(folder.iterdir()):
            bundle.writestr(f"wikitext-2/{path.name}", path.read_bytes())
    return buffer.getvalue()


@pytest.mark.parametrize("variant", ["good", "truncated", "corrupted"])
def test_wikitext_zip_download(server, tmp_path, monkeypatch, variant):
    from tasks.wikitext103 import download

    good = wikitext_zip(tmp_path)
    server.serve("mirror/wikitext-2-v1.zip", served(good, variant))
    monkeypatch.setattr(download, "ZIP_MIRRORS", (server.url("down/{name}"), server.url("mirror/{name}")))
    monkeypatch.setitem(download.ZIP_CHECKSUMS, "wikitext-2", (len(good), sha256(good)))
    monkeypatch.setattr(download, "fetch_hf", lambda dataset: pytest.fail("a bad zip must not fall back"))
    data_dir = tmp_path / "data"
    archive = data_dir / "wikitext-2" / "downloads" / "wikitext-2-v1.zip"
    if variant == "good":
        assert download.prepare("wikitext-2", data_dir).startswith("wikitext-2 (files: ")
        assert (data_dir / "wikitext-2" / "wiki.test.tokens").is_file() and not archive.exists()
    else:
        with pytest.raises(ChecksumError) as error:
            download.prepare("wikitext-2", data_dir)
        assert_mismatch_message(str(error.value), archive, variant, good, "make data-wikitext103")
        assert not (data_dir / "wikitext-2" / "wiki.test.tokens").exists()


def test_wikitext_hf_files_are_checked_against_the_hubs_hashes(tmp_path, monkeypatch):
    import huggingface_hub

    from tasks.wikitext103 import download

    snapshot = tmp_path / "hub" / "datasets--Salesforce--wikitext" / "snapshots" / ("0" * 40)
    path = "wikitext-2-v1/test-00000-of-00001.parquet"
    mismatch = {"path": path, "expected": "a" * 64, "actual": "b" * 64, "algorithm": "sha256"}
    other = dict(mismatch, path="wikitext-103-v1/test-00000-of-00001.parquet")  # another config: not ours
    result = SimpleNamespace(mismatches=[mismatch, other], verified_path=snapshot)  # verify_repo_checksums' answer
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: str(snapshot))
    monkeypatch.setattr(huggingface_hub, "verify_repo_checksums", lambda *args, **kwargs: result)
    with pytest.raises(ChecksumError) as error:
        download.fetch_hf("wikitext-2")
    message = str(error.value)
    assert f"{snapshot / mismatch['path']}: sha256 is {'b' * 64}, expected {'a' * 64}" in message
    assert "wikitext-103-v1" not in message and f"Delete {snapshot.parent.parent}" in message
    assert "make data-wikitext103" in message
    result.mismatches.clear()
    download.fetch_hf("wikitext-2")


# ---------------------------------------------------------------------------------------------------------------
# make data-d4rl


def serve_d4rl_file(server, monkeypatch, tmp_path: Path, name: str, variant: str) -> bytes:
    from tasks.d4rl import download
    from tests.fixtures.d4rl import write_d4rl_dataset

    good = write_d4rl_dataset(tmp_path / "made", name, lengths=[30, 30]).read_bytes()
    monkeypatch.setattr(download, "BASE_URL", server.url("gym_mujoco_v2"))
    server.serve(download.dataset_url(name).split("/", 3)[3], served(good, variant))
    monkeypatch.setitem(download.CHECKSUMS, name, (len(good), sha256(good)))
    return good


@pytest.mark.parametrize("variant", ["good", "truncated", "corrupted"])
def test_d4rl_download(server, tmp_path, monkeypatch, variant):
    from tasks.d4rl import download

    good = serve_d4rl_file(server, monkeypatch, tmp_path, "hopper-medium-v2", variant)
    root = tmp_path / "d4rl"
    report = download.prepare(root, ("hopper-medium-v2",))
    path = root / "hopper-medium-v2.hdf5"
    if variant == "good":
        assert report == {"hopper-medium-v2": []} and read_record(path) == sha256(good)
        assert server.requests == [("/gym_mujoco_v2/hopper_medium-v2.hdf5", None)]
    else:
        (problem,) = report["hopper-medium-v2"]
        assert_mismatch_message(problem, path, variant, good, "make data-d4rl")
        assert not path.exists()


def test_d4rl_check_reports_a_file_changed_since_its_download(server, tmp_path, monkeypatch, capsys):
    from tasks.d4rl import download

    good = serve_d4rl_file(server, monkeypatch, tmp_path, "hopper-medium-v2", "good")
    path = download.fetch("hopper-medium-v2", tmp_path / "d4rl")
    path.write_bytes(served(good, "corrupted"))
    code = download.main(["--data-dir", str(tmp_path), "--check", "--datasets", "hopper-medium-v2"])
    err = capsys.readouterr().err
    assert code == 1 and f"[missing] hopper-medium-v2: {path}: SHA-256 is {sha256(served(good, 'corrupted'))}" in err
    assert f"expected {sha256(good)} (recorded in {record_path(path)}" in err and f"Delete {path}" in err
