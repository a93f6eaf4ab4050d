"""Files of an output folder that are never lost: atomic rewrites and a lock against a second run.

- :func:`atomic_write` replaces a file whole or not at all: the new content goes to a temporary
  file in the same folder, is flushed and ``fsync``-ed, then ``os.replace``-d over the old one
  (a rename within one file system is atomic), so a kill at any moment leaves either the old
  file or the new one.
- :class:`OutputLock` keeps two ``kalmanopt run`` processes out of one ``--out`` folder: the
  first writes its process id into ``<out>/.kalmanopt.lock``; a second one, while that process
  lives, fails with a :class:`ConfigError`. A lock left by a process that no longer exists (a
  ``kill -9``, a crashed node) is detected by its id and taken over.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from kalmanopt.runner.errors import ConfigError

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_with", "naming", "OutputLock", "LOCK_NAME"]

#: the lock file inside an output folder
LOCK_NAME = ".kalmanopt.lock"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_with(path: str | Path, write: Callable[[IO[Any]], None], *, newline: str | None = None,
                      binary: bool = False) -> None:
    """Replace ``path`` by what ``write(file)`` writes into a text (or, ``binary``, bytes) file, atomically
    (see the module)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename: the mode open() gives (0644)
        opened = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline=newline)
        with opened as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:  # (a write's ENOSPC names no file: name it)
            raise naming(exc, path) from exc
        raise
    _fsync_dir(path.parent)


def naming(exc: OSError, path: str | Path) -> OSError:
    """``exc`` with ``path`` as its file name (an ``OSError`` of the same errno), for one-line reports."""
    if exc.filename is not None:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data``, atomically (see :func:`atomic_write`)."""
    atomic_write_with(path, lambda f: f.write(data), binary=True)


def atomic_write(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8), atomically: a kill leaves the old file or the new one."""
    atomic_write_with(path, lambda f: f.write(text))


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM  # it exists, owned by someone else
    return True


class OutputLock:
    """An exclusive claim on an output folder by this process (see the module docstring).

    Use as a context manager, or :meth:`acquire` and :meth:`release`. The folder must exist.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.took_over: dict[str, Any] | None = None  # the stale lock replaced, if any
        self._held = False

    def _owner(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # torn or foreign: treated as stale below

    def acquire(self) -> OutputLock:
        """Claim the folder; ConfigError if a live process holds it."""
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released in between: try again
                pid, host = owner.get("pid"), owner.get("host")
                if isinstance(pid, int) and host == me["host"] and pid != me["pid"] and _alive(pid):
                    raise ConfigError(f"another kalmanopt run (process {pid}) is writing into {str(self.folder)!r}; "
                                      f"wait for it to finish or pass another --out (if no such run exists, "
                                      f"delete {str(self.path)!r})") from None
                if isinstance(pid, int) and host not in (None, me["host"]):
                    raise ConfigError(f"{str(self.folder)!r} is locked by process {pid} on host {host!r}; "
                                      f"wait for it to finish or pass another --out (if that run is gone, "
                                      f"delete {str(self.path)!r})") from None
                # stale: its process is gone; take it over atomically
                self.took_over = owner
                atomic_write(self.path, json.dumps(me))
                if self._owner() == me:
                    self._held = True
                    return self
                continue
            except PermissionError:
                raise ConfigError(f"cannot write into {str(self.folder)!r} (permission denied); "
                                  "pass a writable --out") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(me))
            self._held = True
            return self
        raise ConfigError(f"could not lock {str(self.folder)!r}: another process keeps taking it; pass another --out")

    def release(self) -> None:
        """Give the folder back (only if this process still holds it)."""
        if self._held and (self._owner() or {}).get("pid") == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self._held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
