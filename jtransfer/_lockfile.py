"""Lock files that say who holds them: one writer per run directory, one download per file.

A lock is a small JSON file (host, pid, command, start time) created atomically next to what
it guards. Whoever finds it held can say who holds it, and a lock left by a process that died
without cleaning up (SIGKILL, the OOM killer, a power cut) is recognised as stale: on the same
host its pid is gone (or now belongs to a younger process); on another host only its age can
tell, and only where the holder refreshes it (`LockFile.touch`).

Why a file created with ``link()`` rather than ``fcntl.flock``/``lockf``: run directories and
download caches live on shared cluster file systems, and NFS honours POSIX advisory locks only
when the lock daemon works (and flock not at all on older clients), so a lock could silently
not exclude anything. Creating a name that must not exist is atomic on every file system we
meet, NFS included; ``link()`` of a fully written temporary file (the classic NFS-safe
recipe, see open(2) on O_EXCL) also means a reader never sees a half-written lock. Where hard
links are not supported we fall back to ``O_CREAT | O_EXCL``. The price of a file lock is
that nothing removes it when its holder dies: hence the holder's identity in it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Holder", "LockFile", "current_command", "read_holder"]


def current_command() -> str:
    """This process's command line, as the user typed it (``python -m jtransfer ...``)."""
    import shlex

    argv = list(sys.argv)
    if argv and argv[0].replace(os.sep, "/").endswith("jtransfer/__main__.py"):
        return "python -m jtransfer " + shlex.join(argv[1:])
    return shlex.join([Path(sys.executable).name, *argv]) if argv and argv[0] else "python"


def _pid_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), to tell pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of proc(5), after pid and comm


def _pid_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    if started is not None:
        now = _pid_start(pid)
        if now is not None and now != started:
            return False  # the pid was reused by a younger process
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written in its file.

    Attributes:
        host: the holder's host name.
        pid: its process id.
        command: its command line.
        started: when it took the lock (seconds since the epoch).
        token: a random id of this acquisition, so a holder only ever removes its own lock.
        pid_start: the holder process's start time (Linux), or None.
        age_s: seconds since the lock file was last written or touched.
        path: where the lock file was created (resolved), or None in older locks: a lock
            found elsewhere was copied with its directory and guards nothing here.
    """

    host: str
    pid: int
    command: str
    started: float
    token: str = ""
    pid_start: str | None = None
    age_s: float = 0.0
    path: str | None = None

    @property
    def since(self) -> str:
        """The start time, in UTC."""
        if not self.started:
            return "an unknown time"
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))

    def describe(self) -> str:
        """``python -m jtransfer finetune ... (pid 123 on host, since 2026-01-01 12:00:00 UTC)``"""
        return f"`{self.command}` (pid {self.pid} on {self.host}, since {self.since})"

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def guards(self, path: str | os.PathLike) -> bool:
        """False if this lock was created at another path (copied along with a directory)."""
        return self.path is None or self.path == str(Path(path).resolve())

    def alive(self) -> bool | None:
        """True or False on this host; None on another host (it cannot be checked from here)."""
        if not self.on_this_host():
            return None
        return _pid_alive(self.pid, self.pid_start)


def read_holder(path: str | os.PathLike) -> Holder | None:
    """The holder of the lock at `path`, or None if nobody holds it.

    A lock file that cannot be parsed (written by hand, a damaged disk) is reported as held by
    an unknown process on an unknown host: never treated as free.
    """
    path = Path(path)
    try:
        text = path.read_text()
        age = max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return None
    except OSError as e:
        text, age = f"unreadable: {e}", 0.0
    try:
        d = json.loads(text)
        return Holder(
            host=str(d["host"]),
            pid=int(d["pid"]),
            command=str(d.get("command", "?")),
            started=float(d.get("started", 0.0)),
            token=str(d.get("token", "")),
            pid_start=d.get("pid_start"),
            age_s=age,
            path=d.get("path"),
        )
    except (ValueError, KeyError, TypeError):
        return Holder(
            "an unknown host", 0, f"unknown (unreadable lock file {path})", 0.0, age_s=age
        )


class LockFile:
    """An exclusive lock held by this process, at `path`.

    Args:
        path: the lock file.
        command: what to tell whoever finds it held (default: this process's command line).
        stale_after_s: a lock on another host whose file is older than this is stale (its
            holder refreshes it with `touch` more often than that); None: never, it must be
            removed by hand.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        command: str | None = None,
        stale_after_s: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.command = command or current_command()
        self.stale_after_s = stale_after_s
        self.token = uuid.uuid4().hex
        self.held = False
        self.took_over: Holder | None = None  # the dead holder whose lock this one replaced

    def _content(self) -> str:
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "command": self.command,
                "started": time.time(),
                "token": self.token,
                "pid_start": _pid_start(os.getpid()),
                "path": str(self.path.resolve()),
            }
        )

    def _create(self) -> bool:
        tmp = self.path.with_name(f"{self.path.name}.{self.token}.tmp")
        tmp.write_text(self._content())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE and SMB mounts): O_EXCL instead
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def is_stale(self, holder: Holder) -> bool:
        alive = holder.alive()
        if alive is not None:
            # On this host one directory has one resolved path; another host may mount the
            # same file system elsewhere, so there a different path proves nothing.
            return not alive or not holder.guards(self.path)
        return self.stale_after_s is not None and holder.age_s > self.stale_after_s

    def _remove_stale(self, holder: Holder) -> bool:
        # Two processes may judge the same lock stale at once: each renames it to its own name
        # (only one rename succeeds) and checks it moved the lock it judged, not a fresh one
        # that the other has created meanwhile; that one is put back.
        aside = self.path.with_name(f"{self.path.name}.{self.token}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = read_holder(aside)
        if moved is not None and moved.token == holder.token:
            aside.unlink(missing_ok=True)
            return True
        try:
            os.link(aside, self.path)
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return False

    def acquire(self) -> Holder | None:
        """Takes the lock, taking over a stale one; returns None, or the holder that keeps it.

        Raises:
            OSError: the lock file cannot be written (e.g. a read-only directory).
        """
        for _ in range(10):
            if self._create():
                self.held = True
                return None
            holder = read_holder(self.path)
            if holder is None:
                continue  # released meanwhile
            if not self.is_stale(holder):
                return holder
            if self._remove_stale(holder):
                self.took_over = holder
        holder = read_holder(self.path)
        if holder is None:  # pragma: no cover - ten lost races in a row
            raise OSError(f"could not create the lock file {self.path}")
        return holder

    def touch(self) -> None:
        """Refreshes the lock file's time: the holder is still at work."""
        if self.held:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Removes the lock file if it is still this one's (a no-op otherwise)."""
        if not self.held:
            return
        self.held = False
        holder = read_holder(self.path)
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)
