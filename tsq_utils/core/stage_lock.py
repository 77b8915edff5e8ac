"""A stage folder's lock: one process at a time runs a stage of a run folder; a read-only folder is read unlocked."""

from __future__ import annotations

import errno
import os
from datetime import datetime, timezone
from pathlib import Path

from .stage_paths import display_path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stages are then not protected against a second writer
    fcntl = None  # type: ignore[assignment]


LOCK = ".lock"


class StageBusyError(RuntimeError):
    """Another process holds the stage's lock (it is running the same stage of the same run folder)."""


# Locks this process holds: lock file -> open descriptor (a second setup_stage in the same process reuses it).
HELD_LOCKS: dict[Path, int] = {}
# Stage folders found read-only (no lock could be created): read, never written
READ_ONLY: set[Path] = set()


def acquire_lock(stage_dir: Path, what: str) -> None:
    """Take the stage folder's exclusive lock for this process; StageBusyError naming the holder if another has it."""
    path = (stage_dir / LOCK).absolute()
    if fcntl is None or path in HELD_LOCKS:
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        # A read-only run folder (a copy handed out, a mounted archive): it can be read, its figures, book and
        # summaries rebuilt elsewhere, without a lock; nothing can write to it, so no second writer can either.
        READ_ONLY.add(stage_dir.absolute())
        print(f"[{stage_dir.name}] {display_path(stage_dir)} is read-only: reading it without a lock (a stage that "
              "must rerun cannot, until the folder is writable)")
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise StageBusyError(
            f"{what} is being run by another process ({holder}; lock {display_path(path)}): wait for it to finish, "
            "or stop it (a Jupyter kernel holds the lock until its stage finishes or the kernel is shut down)"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}".encode())
    HELD_LOCKS[path] = fd


def release_lock(stage_dir: Path) -> None:
    """Release the stage folder's lock if this process holds it."""
    fd = HELD_LOCKS.pop((stage_dir / LOCK).absolute(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock
