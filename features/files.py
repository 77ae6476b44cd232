"""The file-system chores around taps' files, apart from what is in them: digests, the writers'
lock, and the checks that an output folder can be written and has room.

Every digest taps computes goes through :func:`digest` (SHA-256 of its parts, in order, its hex
cut to a length by what it is for) or, for files and samples, :func:`file_sha256` and
:func:`content_digest`, so what a digest covers and how long it is are decided here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import TapsError, UsageError

NAME_DIGITS = 8     # in a file or folder name: enough to tell settings apart
RECORD_DIGITS = 16  # recorded in a file: fingerprints, split digests
KEY_DIGITS = 20     # keys of cached exports


def digest(*parts: str | bytes | dict | list, length: int = RECORD_DIGITS) -> str:
    """SHA-256 of ``parts`` fed in order (text as UTF-8, settings as sorted JSON), as ``length`` hex digits."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (dict, list)):
            part = json.dumps(part, sort_keys=True)
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:length]


def short_digest(text: str) -> str:
    """:func:`digest` for a file or folder name."""
    return digest(text, length=NAME_DIGITS)


def content_digest(data: bytes) -> str:
    """128 bits of BLAKE2b of one sample's bytes: equal digests mean byte-identical samples."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_content_digest(path: Path) -> str:
    """:func:`content_digest` of a file, read in 1 MiB blocks ("" for a file that cannot be read)."""
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return ""
    return h.hexdigest()


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    """Where taps keeps what it computes once per machine: ``$TAPS_CACHE``, else ``~/.cache/taps``."""
    return Path(os.environ.get("TAPS_CACHE", Path.home() / ".cache" / "taps"))


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old file or the
    whole new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def path_safe(name: str) -> str:
    """A name as a file or folder name on every OS (``timm:resnet18`` -> ``timm_resnet18``)."""
    return re.sub(r"[^A-Za-z0-9_.+@-]", "_", name)


def check_output_folder(folder: Path, flag: str) -> None:
    """Refuse, before any work, a folder that cannot be made or written: a file in the way, a
    read-only file system, no permission. Nothing is created here."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {folder}: {existing} is a file, in the way of that folder; pass a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder} is not writable ({existing} is read-only or not yours); pass a "
                         f"writable folder")


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse (before any work) to start writing ``needed`` bytes where fewer are free."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise TapsError(f"not enough disk space for {what}: about {needed / 2 ** 20:.1f} MiB needed, "
                        f"{free / 2 ** 20:.1f} MiB free in {folder}; free space or write to another disk (--features-root, --runs-root)")


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``path`` so two writers never touch the same file.

    A POSIX record lock, not flock: DataLoader workers forked while it is held do not
    inherit it, so a killed writer's orphaned workers cannot keep the next run out.
    The lock file is removed when the lock is released (no empty ``.lock`` files are left
    behind); a process that locked a file another one has just removed sees that its inode
    is no longer the one at the path and takes the new one instead.
    """
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            os.close(fd)
            raise TapsError(f"another taps process is writing {path}; wait for it to finish, "
                            f"then rerun (finished batches are kept)") from None
        if _same_file(fd, lock_path):
            break
        os.close(fd)  # removed by the holder that just finished: lock the file at the path now
    else:
        raise TapsError(f"could not lock {path} (its lock file keeps changing); rerun")
    try:
        yield
    finally:
        if _same_file(fd, lock_path):
            lock_path.unlink(missing_ok=True)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
