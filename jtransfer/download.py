"""Checksummed downloads into a cache directory, and zip extraction that stays inside its target.

Everything here is standard library (plus tqdm for the progress bar) and never imports torch.
The machines jtransfer is developed on have no network, so every failure mode ends in a
`DownloadError` or `DataError` that says what happened and how to supply the file by hand.

d2l's hot-dog data set, for instance, is fetched and unpacked with::

    zip_path = fetch("https://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip",
                     cache_dir() / "hotdog.zip", sha1="fba480ffa8aa7e0febbb511d181409f899b9baa5")
    data_root = safe_extract_zip(zip_path, cache_dir())

Example:
    The same with a local archive (``file://`` URLs work like ``https://`` ones):

    >>> import tempfile, zipfile
    >>> from pathlib import Path
    >>> from jtransfer.download import fetch, file_hashes, safe_extract_zip
    >>> tmp = tempfile.TemporaryDirectory()
    >>> archive = Path(tmp.name) / "hotdog.zip"
    >>> with zipfile.ZipFile(archive, "w") as z:
    ...     z.writestr("hotdog/train/hotdog/0.jpg", b"not really a JPEG")
    >>> sha1, sha256 = file_hashes(archive)
    >>> zip_path = fetch(archive.as_uri(), Path(tmp.name) / "cache" / "hotdog.zip", sha1=sha1,
    ...                  progress=False)
    >>> data_root = safe_extract_zip(zip_path, Path(tmp.name) / "data")
    >>> [p.relative_to(data_root).as_posix() for p in data_root.rglob("*.jpg")]
    ['hotdog/train/hotdog/0.jpg']
    >>> tmp.cleanup()
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from tqdm.auto import tqdm

from jtransfer import _lockfile
from jtransfer.errors import DataError, DownloadError

__all__ = ["cache_dir", "fetch", "file_hashes", "safe_extract_zip"]

_CHUNK = 1 << 20

# What a dead network, a refused connection, a stalled server or a connection cut mid-file
# raises. Disk errors (a full disk) are deliberately not listed: they are not "offline".
_NETWORK_ERRORS = (
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    socket.timeout,
    TimeoutError,
)


def cache_dir() -> Path:
    """Returns the directory where downloads are cached.

    Returns:
        ``$JTRANSFER_CACHE`` if set (and non-empty), else ``~/.cache/jtransfer``. The directory
        is not created here; `fetch` creates it on first use.
    """
    return Path(os.environ.get("JTRANSFER_CACHE") or "~/.cache/jtransfer").expanduser()


def file_hashes(path: str | os.PathLike[str]) -> tuple[str, str]:
    """Hashes a file in chunks.

    Args:
        path: the file.

    Returns:
        ``(sha1_hex, sha256_hex)``, lowercase.
    """
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha1.update(chunk)
            sha256.update(chunk)
    return sha1.hexdigest(), sha256.hexdigest()


def _checksum_problem(
    got_sha1: str, got_sha256: str, sha1: str | None, sha256_prefix: str | None
) -> str | None:
    """Describes the first expected hash that does not match, or returns None if all match."""
    if sha1 is not None and got_sha1 != sha1.lower():
        return f"expected sha1 {sha1.lower()}, got {got_sha1}"
    # torchvision names its weight files after the first hex digits of their sha256
    # (resnet18-f37072fd.pth), so a prefix is what callers usually know.
    if sha256_prefix is not None and not got_sha256.startswith(sha256_prefix.lower()):
        return f"expected sha256 starting with {sha256_prefix.lower()}, got {got_sha256}"
    return None


def fetch(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256_prefix: str | None = None,
    sha1: str | None = None,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Downloads ``url`` to ``dest`` unless it is already there, verifying its checksum.

    The file is written to a temporary file beside ``dest`` (``.NAME.part``) and renamed into
    place only after its checksum matched, so ``dest`` never holds a partial or corrupt
    download, whatever interrupts the transfer (including Ctrl-C, which removes the
    temporary file).

    Processes that fetch the same ``dest`` at once (two jobs starting together) download it
    once: the first takes a lock file beside it (``.NAME.lock``: host, pid, URL), the others
    wait for it and then use its verified file. A download killed outright (SIGKILL, the OOM
    killer, a lost machine) leaves its ``.part`` and its lock; the next fetch takes over the
    lock (its holder's pid is gone, or on another host the lock went unrefreshed for a
    minute or more) and continues the ``.part`` where the server supports HTTP ranges, or
    starts afresh where it does not; the checksum covers the joined file.

    Args:
        url: what to download (``http(s)://`` or ``file://``).
        dest: where the file is cached. Its directory is created if needed.
        sha256_prefix: expected leading hex digits of the file's sha256 (or the whole digest).
        sha1: expected full sha1 hex digest.
        timeout: seconds to wait for the server before giving up (per blocking operation).
        progress: show a tqdm progress bar.

    Returns:
        ``dest`` as a `Path`.

    Raises:
        DownloadError: the download failed (no network, server error, timeout), or the
            downloaded or cached file does not match the expected checksum. A mismatching
            file is removed first, so running again downloads it afresh.
    """
    dest = Path(dest)
    if dest.exists():
        return _verified_cache(dest, url, sha1, sha256_prefix)
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = _lockfile.LockFile(
        dest.with_name(f".{dest.name}.lock"),
        command=f"download of {url}",
        stale_after_s=max(_STALE_MIN_S, 4 * timeout),
    )
    _wait_for(lock, f"downloading {dest}", progress)
    try:
        if dest.exists():  # downloaded by the process we waited for
            return _verified_cache(dest, url, sha1, sha256_prefix)
        _download_locked(url, dest, lock, sha1, sha256_prefix, timeout, progress)
    finally:
        lock.release()
    return dest


# A download refreshes its lock file at least this often; a waiter on another host takes
# the lock over once it has gone unrefreshed for _STALE_MIN_S (or 4 timeouts, if longer).
_TOUCH_S = 2.0
_STALE_MIN_S = 60.0


def _wait_for(lock: _lockfile.LockFile, what: str, progress: bool) -> None:
    """Takes `lock`, waiting while another live process holds it (saying so once)."""
    told, pause = False, 0.05
    while (holder := lock.acquire()) is not None:
        if not told and progress:
            print(f"waiting for another process {what}: {holder.describe()}", file=sys.stderr)
        told = True
        time.sleep(pause)
        pause = min(2 * pause, 1.0)


def _verified_cache(dest: Path, url: str, sha1: str | None, sha256_prefix: str | None) -> Path:
    problem = _checksum_problem(*file_hashes(dest), sha1, sha256_prefix)
    if problem is not None:
        dest.unlink(missing_ok=True)
        raise DownloadError(
            f"The cached file {dest} does not match its checksum ({problem}); it has been "
            f"removed. Run again to download it afresh from {url}."
        )
    return dest


def _download_locked(url, dest: Path, lock, sha1, sha256_prefix, timeout, progress) -> None:
    """The download itself, under `lock`: into ``.NAME.part`` (continued if one was left)."""
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        with open(tmp, "a+b") as out:
            got_sha1, got_sha256 = _download_to(
                url,
                out,
                desc=dest.name,
                timeout=timeout,
                progress=progress,
                on_chunk=_throttled(lock.touch, _TOUCH_S),
            )
        problem = _checksum_problem(got_sha1, got_sha256, sha1, sha256_prefix)
        if problem is not None:
            raise DownloadError(
                f"The file downloaded from {url} does not match its checksum ({problem}); it "
                f"has been removed and nothing was saved at {dest}. The download may have been "
                "corrupted or the file changed on the server; run again, or download it "
                f"elsewhere, check it, and put it at {dest}."
            )
        os.replace(tmp, dest)
    except _NETWORK_ERRORS as e:
        tmp.unlink(missing_ok=True)
        raise DownloadError(
            f"Could not download {url}: {_reason(e)}. This machine may be offline or the server "
            f"unreachable. Download the file on a machine with network access and put it at "
            f"{dest} (or pass the path of a local copy instead)."
        ) from e
    except BaseException:
        # Includes KeyboardInterrupt: a half-written temp file must never outlive the call.
        tmp.unlink(missing_ok=True)
        raise


def _throttled(fn: Callable[[], None], every_s: float) -> Callable[[], None]:
    last = [0.0]

    def call() -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            fn()

    return call


def _reason(error: BaseException) -> str:
    """A short human-readable reason for a network error."""
    if isinstance(error, urllib.error.HTTPError):
        return f"the server answered HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _open(url: str, have: int, timeout: float):
    """The response to a GET of `url`, asking for the bytes from `have` on if `have` > 0."""
    headers = {"User-Agent": "jtransfer"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if have and e.code == 416:  # the partial file is not a prefix of this one: restart
            return _open(url, 0, timeout)
        raise


def _continues_at(response, have: int) -> bool:
    """True if `response` is the rest of the file from byte `have` (HTTP 206 from there)."""
    if not have or getattr(response, "status", None) != 206:
        return False
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return bool(match) and int(match.group(1)) == have


def _download_to(
    url: str,
    out: BinaryIO,
    *,
    desc: str,
    timeout: float,
    progress: bool,
    on_chunk: Callable[[], None] | None = None,
) -> tuple[str, str]:
    """Streams ``url`` into the open binary file ``out``, hashing as it goes.

    If ``out`` (opened ``a+b``) already holds the start of the file, a server that supports
    ranges sends only the rest; otherwise ``out`` is emptied and the whole file fetched.

    Returns:
        ``(sha1_hex, sha256_hex)`` of the whole file.
    """
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    have = out.seek(0, os.SEEK_END)
    with _open(url, have, timeout) as response:
        out.seek(0)
        if _continues_at(response, have):
            while chunk := out.read(_CHUNK):
                sha1.update(chunk)
                sha256.update(chunk)
        else:
            out.truncate()
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        received = have
        with tqdm(
            total=total,
            initial=have,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=not progress,
        ) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                sha1.update(chunk)
                sha256.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
                if on_chunk is not None:
                    on_chunk()
    if total is not None and received != total:
        # A server that closes early is a network failure, not a checksum surprise.
        raise http.client.IncompleteRead(b"", total - received)
    return sha1.hexdigest(), sha256.hexdigest()


def _unsafe_entry_reason(info: zipfile.ZipInfo, target: Path) -> str | None:
    """Explains why extracting ``info`` under ``target`` would be unsafe, or returns None."""
    name = info.filename
    if (
        PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or (PureWindowsPath(name).drive)
    ):
        return "it is an absolute path"
    if stat.S_ISLNK(info.external_attr >> 16):
        # A symlink entry could point anywhere; a later entry written through it would escape.
        return "it is a symbolic link"
    # Resolve against the real target so "a/../../x" is caught however it is spelled.
    resolved = (target / name).resolve()
    if resolved != target and target not in resolved.parents:
        return f"it would be written outside {target}"
    return None


def safe_extract_zip(zip_path: str | os.PathLike[str], target_dir: str | os.PathLike[str]) -> Path:
    """Extracts a zip archive into ``target_dir``, refusing entries that would escape it.

    Every entry is checked before anything is written: an absolute path, a path that resolves
    outside ``target_dir`` ("zip slip", e.g. ``../evil``) or a symbolic link makes the whole
    archive rejected. Extraction goes to a temporary directory beside ``target_dir``, and the
    archive's top-level entries are then renamed into place, so an interrupted extraction leaves
    no half-written tree. A top-level entry that already exists in ``target_dir`` is replaced,
    as re-extracting the same archive should.

    Args:
        zip_path: the archive.
        target_dir: where its entries go (created if needed).

    Returns:
        ``target_dir`` as a `Path`.

    Raises:
        DataError: the archive is missing, corrupt, or holds an unsafe entry (the message
            names it).
    """
    zip_path = Path(zip_path)
    target = Path(target_dir)
    real_target = target.resolve()
    corrupt = (
        f"Delete {zip_path} and download it again (a cached download may have been cut short)."
    )
    try:
        with zipfile.ZipFile(zip_path) as archive:
            infos = archive.infolist()
            for info in infos:
                reason = _unsafe_entry_reason(info, real_target)
                if reason is not None:
                    raise DataError(
                        f"Refusing to extract {zip_path}: its entry {info.filename!r} is unsafe "
                        f"({reason}). Nothing was extracted. Only use archives from a source "
                        "you trust."
                    )
            target.mkdir(parents=True, exist_ok=True)
            # Two processes extracting into one target would rename over each other's
            # trees: one at a time (the second re-extracts the same archive, harmlessly).
            lock = _lockfile.LockFile(
                target / ".jtransfer-extract.lock", command=f"extraction of {zip_path}"
            )
            _wait_for(lock, f"extracting into {target}", progress=True)
            staging = Path(tempfile.mkdtemp(dir=target, prefix=".extract-"))
            try:
                for info in infos:
                    archive.extract(info, staging)
                _move_children(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                lock.release()
    except FileNotFoundError as e:
        raise DataError(f"Zip archive {zip_path} does not exist: {e}.") from e
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        # BadZipFile covers a wrong magic number and CRC mismatches found while extracting.
        raise DataError(
            f"{zip_path} is not a valid zip archive or is corrupt ({e}). {corrupt}"
        ) from e
    return target


def _move_children(staging: Path, target: Path) -> None:
    """Renames each top-level entry of ``staging`` into ``target``, replacing existing ones.

    Each rename is atomic because ``staging`` lives inside ``target`` (same file system). An
    existing entry is first renamed aside, so a reader never sees a mix of old and new files.
    """
    replaced = staging.with_name(staging.name + "-replaced")
    try:
        for child in sorted(staging.iterdir()):
            dest = target / child.name
            if dest.exists() or dest.is_symlink():
                replaced.mkdir(exist_ok=True)
                os.replace(dest, replaced / child.name)
            os.replace(child, dest)
    finally:
        shutil.rmtree(replaced, ignore_errors=True)
