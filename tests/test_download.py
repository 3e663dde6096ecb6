"""Spec of jtransfer.download, against a real HTTP server on 127.0.0.1 and archives we write."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from jtransfer import download
from jtransfer.errors import DataError, DownloadError

PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)  # several chunks, odd length
SHA1 = hashlib.sha1(PAYLOAD).hexdigest()
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the fixture directory, plus /short: a response cut off before its length."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/short":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            return
        super().do_GET()

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def http_server(tmp_path_factory):
    """A threaded HTTP server on a free port of 127.0.0.1 serving a directory of its own."""
    root = tmp_path_factory.mktemp("www")
    (root / "file.bin").write_bytes(PAYLOAD)
    handler = functools.partial(_Handler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def closed_port_url():
    """A URL on a port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.bin"


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.mark.parametrize(
    "checksums",
    [
        {"sha1": SHA1},
        {"sha256_prefix": SHA256[:8]},
        {"sha1": SHA1.upper(), "sha256_prefix": SHA256},
    ],
)
def test_fetch_downloads_and_verifies(http_server, tmp_path, checksums):
    dest = tmp_path / "cache" / "sub" / "file.bin"
    got = download.fetch(f"{http_server}/file.bin", dest, progress=False, **checksums)
    assert got == dest and dest.read_bytes() == PAYLOAD
    assert _leftovers(dest.parent) == ["file.bin"]  # no temp file left behind


def test_fetch_bad_checksum_leaves_nothing(http_server, tmp_path):
    cache = tmp_path / "cache"
    url = f"{http_server}/file.bin"
    with pytest.raises(DownloadError) as e:
        download.fetch(url, cache / "file.bin", sha1="0" * 40, progress=False)
    message = str(e.value)
    assert url in message and "0" * 40 in message and SHA1 in message and "removed" in message
    assert _leftovers(cache) == []

    with pytest.raises(DownloadError, match="sha256 starting with deadbeef"):
        download.fetch(url, cache / "file.bin", sha256_prefix="deadbeef", progress=False)
    assert _leftovers(cache) == []


def test_fetch_offline_names_url_and_what_to_do(closed_port_url, tmp_path):
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(DownloadError) as e:
        download.fetch(closed_port_url, dest, sha1=SHA1, progress=False)
    message = str(e.value)
    assert closed_port_url in message and "offline" in message and str(dest) in message
    assert _leftovers(dest.parent) == []


def test_fetch_http_error(http_server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404") as e:
        download.fetch(f"{http_server}/missing.zip", tmp_path / "m.zip", progress=False)
    assert f"{http_server}/missing.zip" in str(e.value)
    assert _leftovers(tmp_path) == []


def test_fetch_truncated_transfer(http_server, tmp_path):
    with pytest.raises(DownloadError, match="/short"):
        download.fetch(f"{http_server}/short", tmp_path / "short", progress=False)
    assert _leftovers(tmp_path) == []


def test_fetch_timeout_on_silent_server(tmp_path):
    # The kernel completes the TCP handshake from the listen backlog; nobody ever answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/file.bin"
        with pytest.raises(DownloadError, match="offline") as e:
            download.fetch(url, tmp_path / "f", timeout=0.3, progress=False)
    assert url in str(e.value)
    assert _leftovers(tmp_path) == []


def test_fetch_reuses_cached_file_without_network(http_server, closed_port_url, tmp_path):
    dest = tmp_path / "file.bin"
    download.fetch(f"{http_server}/file.bin", dest, sha1=SHA1, progress=False)
    # Same destination, unreachable URL: the verified cached copy is returned.
    assert download.fetch(closed_port_url, dest, sha1=SHA1, progress=False) == dest
    assert download.fetch(closed_port_url, dest, progress=False) == dest


def test_fetch_removes_corrupt_cached_file(closed_port_url, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"a stale partial copy")
    with pytest.raises(DownloadError) as e:
        download.fetch(closed_port_url, dest, sha1=SHA1, progress=False)
    assert str(dest) in str(e.value) and "removed" in str(e.value) and "again" in str(e.value)
    assert not dest.exists()


def test_fetch_interrupted_leaves_no_temp_file(http_server, tmp_path, monkeypatch):
    def interrupted(url, out, **kwargs):
        out.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "_download_to", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download.fetch(f"{http_server}/file.bin", tmp_path / "file.bin", progress=False)
    assert _leftovers(tmp_path) == []


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("JTRANSFER_CACHE", str(tmp_path / "c"))
    assert download.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("JTRANSFER_CACHE")
    assert download.cache_dir() == Path.home() / ".cache" / "jtransfer"


# ------------------------------------------------------------------------------ zip


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, content in entries.items():
            z.writestr(zipfile.ZipInfo(name), content)
    return path


def test_safe_extract_zip_extracts_tree(tmp_path):
    archive = _zip(
        tmp_path / "a.zip",
        {"hotdog/train/hotdog/1.jpg": b"1", "hotdog/test/not-hotdog/2.jpg": b"2", "top.txt": b"t"},
    )
    out = download.safe_extract_zip(archive, tmp_path / "out")
    assert out == tmp_path / "out"
    assert (out / "hotdog/train/hotdog/1.jpg").read_bytes() == b"1"
    assert (out / "hotdog/test/not-hotdog/2.jpg").read_bytes() == b"2"
    assert _leftovers(out) == ["hotdog", "top.txt"]  # no staging directory left

    # Extracting again (e.g. a newer archive) replaces the top-level entries.
    _zip(archive, {"hotdog/train/hotdog/1.jpg": b"new"})
    download.safe_extract_zip(archive, out)
    assert (out / "hotdog/train/hotdog/1.jpg").read_bytes() == b"new"
    assert not (out / "hotdog/test").exists()
    assert _leftovers(out) == ["hotdog", "top.txt"]


@pytest.mark.parametrize(
    "evil", ["../evil", "ok/../../evil", "/tmp/jtransfer-abs-evil", "C:/evil", "a/../../../evil"]
)
def test_safe_extract_zip_refuses_escaping_entries(tmp_path, evil):
    archive = _zip(tmp_path / "evil.zip", {"fine.txt": b"x", evil: b"pwned"})
    target = tmp_path / "work" / "target"
    with pytest.raises(DataError) as e:
        download.safe_extract_zip(archive, target)
    assert repr(evil) in str(e.value) and "Nothing was extracted" in str(e.value)
    assert not target.exists()
    assert _leftovers(tmp_path) == ["evil.zip"]
    assert not Path("/tmp/jtransfer-abs-evil").exists()


def test_safe_extract_zip_refuses_symlinks(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as z:
        info = zipfile.ZipInfo("data/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc")
        z.writestr("data/link/passwd", b"through the link")
    with pytest.raises(DataError, match="symbolic link"):
        download.safe_extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_safe_extract_zip_corrupt_archive(tmp_path):
    archive = tmp_path / "hotdog.zip"
    archive.write_bytes(os.urandom(4096))
    with pytest.raises(DataError) as e:
        download.safe_extract_zip(archive, tmp_path / "out")
    assert str(archive) in str(e.value) and "download it again" in str(e.value)


def test_safe_extract_zip_bad_crc_leaves_no_partial_tree(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"d/first.txt": b"fine", "d/second.txt": b"B" * 1000})
    raw = bytearray(archive.read_bytes())
    raw[raw.index(b"B" * 1000) + 500] ^= 0xFF  # flip a stored byte: CRC check fails on extract
    archive.write_bytes(bytes(raw))
    target = tmp_path / "out"
    with pytest.raises(DataError, match="corrupt"):
        download.safe_extract_zip(archive, target)
    assert _leftovers(target) == []  # d/first.txt was extracted to staging, never moved in


def test_safe_extract_zip_missing_archive(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        download.safe_extract_zip(tmp_path / "nope.zip", tmp_path / "out")


# ------------------------------------------------------------------------------ two at once


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    """Sends PAYLOAD in 64 KiB pieces, honouring "Range: bytes=N-"; after the first piece it
    waits for ``server.go`` (a threading.Event), so a test controls when a download ends.

    Every GET's Range header (None without one) is appended to ``server.gets``.
    """

    def do_GET(self):  # noqa: N802 (http.server's naming)
        rng = self.headers.get("Range")
        self.server.gets.append(rng)
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()
        for i in range(start, len(PAYLOAD), 64 * 1024):
            self.wfile.write(PAYLOAD[i : i + 64 * 1024])
            self.wfile.flush()
            self.server.go.wait(timeout=60)

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    server.gets, server.go = [], threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/file.bin"
    finally:
        server.go.set()
        server.shutdown()
        server.server_close()
        thread.join()


_FETCH = "import sys; from jtransfer.download import fetch; fetch(*sys.argv[1:3], sha1=sys.argv[3])"


def test_two_processes_fetching_one_file_download_it_once(slow_server, tmp_path):
    server, url = slow_server
    dest = tmp_path / "cache" / "file.bin"

    def start() -> subprocess.Popen:
        argv = [sys.executable, "-c", _FETCH, url, str(dest), SHA1]
        return subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)

    first = start()
    deadline = time.monotonic() + 60
    while not server.gets:  # the first is downloading (the server holds it at 64 KiB)
        assert first.poll() is None and time.monotonic() < deadline, "no download started"
        time.sleep(0.01)
    second = start()
    waiting = second.stderr.readline()  # blocks until the second says what it waits for
    assert "waiting for another process downloading" in waiting, waiting
    assert f"pid {first.pid}" in waiting and url in waiting
    server.go.set()
    for proc in (first, second):
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        proc.stderr.close()
    assert dest.read_bytes() == PAYLOAD
    assert _leftovers(dest.parent) == ["file.bin"]  # no .part, no lock
    assert server.gets == [None]  # one download; the second used its verified file


def _stale_lock(dest: Path) -> None:
    """The lock a download killed outright leaves: its process is gone."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = {"host": socket.gethostname(), "pid": gone.pid, "command": "download", "started": 0}
    dest.with_name(f".{dest.name}.lock").write_text(json.dumps(lock))


def test_a_killed_download_is_continued_where_it_stopped(slow_server, tmp_path):
    server, url = slow_server
    server.go.set()
    dest = tmp_path / "file.bin"
    half = len(PAYLOAD) // 2
    dest.with_name(".file.bin.part").write_bytes(PAYLOAD[:half])
    _stale_lock(dest)
    assert download.fetch(url, dest, sha1=SHA1, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert server.gets == [f"bytes={half}-"]  # only the rest was sent
    assert _leftovers(tmp_path) == ["file.bin"]


def test_a_killed_download_restarts_where_the_server_cannot_continue(http_server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.with_name(".file.bin.part").write_bytes(b"the start of some other file")
    _stale_lock(dest)
    # http.server ignores Range and sends the whole file: the partial bytes are dropped.
    assert download.fetch(f"{http_server}/file.bin", dest, sha1=SHA1, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert _leftovers(tmp_path) == ["file.bin"]
