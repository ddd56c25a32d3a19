"""One writer per artifact: exclusive locks on outputs and work dirs, and unique temp names next to a target.

An output ``dir/name`` is locked through the sibling file ``dir/.name.lock`` (``fcntl.flock``), never through a
file inside the output, so a directory output (a DVC ``outs`` entry such as ``artifacts/rpn``) holds only what
the stage wrote. A second process that asks for a held lock fails at once with :class:`OutputLocked`, whose
one-line message names the output; it never waits silently. The kernel drops a lock when its holder dies
(even by ``kill -9``), so a crash never leaves an output locked. Lock files are left in place on release:
deleting one while another process opens it would let two processes each lock a different file.

Temp files and directories are named ``dir/.name.<12 hex>.tmp``: unique per writer (two writers never share
one, unlike a fixed ``name.tmp``), in the target's own folder (so the final rename is atomic), and matched by
a pattern that no other output's temps match, so the holder of ``name``'s lock may delete stale ones left by
a killed writer.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from functools import cache
from pathlib import Path


class OutputLocked(RuntimeError):
    """Another process holds the lock on an output or work dir; the message names it."""


# Locks this process holds: lock file -> [fd, depth]. Re-entrant so a stage can hold its output's lock for the
# whole run while the library's writers (write_parquet, RPN.save, ...) take the same lock again around the
# write: a second flock on a new descriptor would conflict with our own first one.
_HELD: dict[Path, list[int]] = {}
_GUARD = threading.Lock()


def lock_file(path: str | os.PathLike) -> Path:
    """The sibling lock file of output ``path``: ``<folder>/.<name>.lock``."""
    p = Path(os.path.abspath(path))
    return p.parent / f".{p.name}.lock"


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _acquire(path: Path, given: str, kind: str) -> Path:
    lock = lock_file(path)
    with _GUARD:
        if lock in _HELD:
            _HELD[lock][1] += 1
            return lock
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise OutputLocked(
                f"{kind} {given}: another sdrpn process{_holder(lock)} is writing it; "
                f"wait for it to finish (or stop it) and rerun [lock file {lock}]"
            ) from None
        # the holder's pid, only so that the error above can name it
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[lock] = [fd, 1]
    _remove_stale_temps(path)
    return lock


def _release(lock: Path) -> None:
    with _GUARD:
        entry = _HELD[lock]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[lock]
            os.close(entry[0])  # closing the only descriptor drops the flock


@contextmanager
def output_lock(*paths: str | os.PathLike, kind: str = "output") -> Iterator[None]:
    """Hold the exclusive lock of every path in ``paths`` (an output file or directory, or a work dir).

    Raises :class:`OutputLocked` at once, naming the path, if another process holds any of them; re-entrant
    within one process. While held, temps left by a killed writer of the same path are deleted.
    """
    # a fixed order, so two processes locking overlapping sets cannot each hold one and miss the other
    targets = sorted({Path(os.path.abspath(p)): str(p) for p in paths}.items())
    taken: list[Path] = []
    try:
        for p, given in targets:
            taken.append(_acquire(p, given, kind))
        yield
    finally:
        for lock in reversed(taken):
            _release(lock)


def _temp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{12}}\.tmp")


def _remove_stale_temps(path: Path) -> None:
    """Delete temps of ``path`` left by killed writers; only called while holding ``path``'s lock."""
    pattern = _temp_pattern(path.name)
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        if pattern.fullmatch(entry.name):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with suppress(FileNotFoundError):
                    os.unlink(entry.path)


@cache
def _umask() -> int:
    # temps get the mode a plain open() would give (mkstemp's 0600 would leak into the artifact); os.umask can
    # only be read by setting it, process-wide, so it is read once
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_temp(target: Path, directory: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            if directory:
                os.mkdir(tmp, 0o777 & ~_umask())
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask()))
            return tmp
        except FileExistsError:
            continue


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


def replace_path(src: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move file or directory ``src`` (in ``target``'s folder) onto ``target``, replacing what is there.

    A file is replaced atomically. A directory target is first renamed aside, so a crash in between leaves
    ``src`` complete under its temp name and the old target under another; never a half-written target.
    """
    src, target = Path(src), Path(target)
    if src.is_dir() and target.exists():
        old = _new_temp(target, directory=True)
        os.replace(target, old)  # onto an empty directory: allowed by rename(2)
        os.replace(src, target)
        _remove(old)
    else:
        os.replace(src, target)


@contextmanager
def atomic_path(target: str | os.PathLike, directory: bool = False, lock: bool = True) -> Iterator[Path]:
    """Yield a fresh temp path next to ``target``; on success it replaces ``target``, on error it is deleted.

    ``directory=True`` yields an empty directory. ``lock=True`` holds ``target``'s lock meanwhile (a no-op if
    this process already holds it); callers that own an enclosing locked directory (a PartStore) pass False.
    """
    target = Path(target)
    with output_lock(target) if lock else nullcontext():
        tmp = _new_temp(target, directory)
        try:
            yield tmp
            replace_path(tmp, target)
        except BaseException:
            _remove(tmp)
            raise


def publish_dir(src: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move directory ``src`` (anywhere) onto ``target``, replacing it; across filesystems through a temp copy."""
    src, target = Path(src), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(target):
        if os.stat(src).st_dev == os.stat(target.parent).st_dev:
            replace_path(src, target)
            return
        with atomic_path(target, directory=True) as tmp:
            os.rmdir(tmp)
            shutil.copytree(src, tmp)
        shutil.rmtree(src)
