"""Write a directory atomically beside its destination, and never lose what was there.

The contract a compile keeps, whatever happens to the process (an exception, a full disk, ``kill -9``):

* the destination holds either the previous complete artifact or the new complete one, never a mix and
  never nothing;
* a directory that is not a ditq artifact is never replaced unless the caller passes ``force``;
* what a killed compile leaves behind is a hidden sibling of ditq's own naming
  (``.NAME.tmp-XXXXXXXX``, or ``.NAME.old-XXXXXXXX`` from the fallback below), which the next compile
  to the same destination removes, once it knows that no live compile is using it.

How the replacement is made atomic: on Linux, ``renameat2(RENAME_EXCHANGE)`` swaps the staging
directory and the destination in one step; the old artifact ends at the staging name and is removed.
Where the kernel or the file system cannot exchange, the fallback renames the old artifact to
``.NAME.old-XXXXXXXX`` and the staging directory into place; a kill between those two renames leaves no
artifact at the destination for a moment, and :func:`recover_interrupted_replace` (run by the next
compile and by ``Artifact.load``) renames the backup back.

Liveness of a staging directory is an ``flock`` on it, held by the compile that created it: the kernel
drops it when the process dies, so a directory nobody holds is stale. Directories are created with
``os.mkdir`` (the umask applies, as for any ``mkdir``), so another user's serving process can read the
artifact when the umask allows it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ArtifactError, DitqError
from .integrity import KNOWN_FILES, MANIFEST_FILE

try:
    import fcntl
except ImportError:  # not POSIX: liveness falls back to the age of the directory
    fcntl = None

_SUFFIX_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"  # tempfile's, so older ditq's leftovers match too
_SUFFIX_LENGTH = 8
_STALE_AGE_WITHOUT_LOCKS = 24 * 3600.0
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class WriteError(DitqError, OSError):
    """Writing a file failed (disk full, a file-size limit, permissions). Still an ``OSError``, so callers
    that catch those keep working; a ``DitqError``, so the CLI prints it as one line."""


def write_error(exc: OSError, what: str) -> WriteError:
    """One line for a failed write, with the cause a user can act on."""
    target = f" {exc.filename}" if exc.filename else ""
    hint = " (disk full or a file-size limit: free space or choose another -o)" \
        if exc.errno in _DISK_FULL_ERRNOS else " (choose a writable -o)" \
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR) else ""
    return WriteError(f"cannot write {what}:{target}: {exc.strerror or exc}{hint}")


# ---------------------------------------------------------------------------------------------
# What may be replaced
# ---------------------------------------------------------------------------------------------

def is_artifact_directory(path: Path) -> bool:
    """A directory ditq wrote (any format version): only artifact file names and a manifest with a
    format_version. Such a directory may be replaced without ``--force``; an empty one too."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    if not entries:
        return True
    if any(entry.name not in KNOWN_FILES or not entry.is_file(follow_symlinks=False) for entry in entries):
        return False
    try:
        with open(path / MANIFEST_FILE, "rb") as handle:
            manifest = json.loads(handle.read(1 << 24))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest


def check_output_dir(destination: str | Path, force: bool = False) -> Path:
    """Refuse a destination that would lose a user's files; returns it resolved.

    A missing path, an empty directory and a ditq artifact may be replaced; any other directory only
    with ``force``; a file never.
    """
    destination = Path(destination).resolve()
    if destination.is_symlink() or (destination.exists() and not destination.is_dir()):
        raise ArtifactError(f"{destination} exists and is not a directory; choose another -o")
    if destination.is_dir() and not force and not is_artifact_directory(destination):
        sample = sorted(p.name for p in destination.iterdir())[:3]
        raise ArtifactError(f"{destination} exists and is not a ditq artifact (it holds {', '.join(sample)}"
                            f"{', ...' if len(sample) == 3 else ''}); choose another -o, or pass --force to "
                            "replace it and delete its contents")
    return destination


# ---------------------------------------------------------------------------------------------
# Staging
# ---------------------------------------------------------------------------------------------

@contextmanager
def staging_directory(destination: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty directory beside ``destination``; on success it replaces ``destination`` atomically,
    on failure it is removed and ``destination`` is untouched.

    Opened before the long work, it is the compile's reservation of ``destination``: a mount point, a parent
    that cannot be created or written, and a destination another live compile is writing are refused here, in
    one line, not after minutes of calibration. Parent directories it created are removed again on failure.
    ``OSError`` raised while making, syncing or renaming it becomes a one-line :class:`WriteError`; the caller
    translates its own writes into the directory with :func:`writing_into` (an ``OSError`` of the work itself,
    such as an unreadable checkpoint, is not about ``-o`` and passes through as it is).
    """
    destination = check_output_dir(destination, force)
    refuse_mount_point(destination)
    created: list[Path] = []
    try:
        _make_parents(destination.parent, created)
        recover_interrupted_replace(destination)
        remove_stale_staging(destination)
        staging, lock = _create_locked_staging(destination)
    except OSError as exc:
        _remove_created(created)
        raise write_error(exc, f"the artifact {destination}") from None
    replaced = False
    try:
        refuse_concurrent_writer(destination, staging)
        yield staging
        with writing_into(destination):
            _sync_tree(staging)
            check_output_dir(destination, force)  # someone may have put files there while we compiled
            _replace(staging, destination)
        replaced = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the new artifact's old place, or the old artifact
        if lock is not None:
            os.close(lock)
        if not replaced:
            _remove_created(created)


@contextmanager
def writing_into(destination: Path) -> Iterator[None]:
    """Around the writes of an artifact's files: an ``OSError`` (a full disk, a file-size limit) becomes one
    :class:`WriteError` line naming the artifact; a ``WriteError`` already said so and passes as it is."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise write_error(exc, f"the artifact {destination}") from None


def refuse_mount_point(destination: Path) -> None:
    """An artifact replaces its directory by a rename, which a mount point refuses ("Device or resource busy"
    at the very end of a compile): refused before any work, with where to write instead."""
    if destination.is_dir() and os.path.ismount(destination):
        raise ArtifactError(f"-o {destination} is a mount point, which ditq cannot replace atomically (it renames "
                            f"the finished artifact into place); choose a directory inside it, e.g. "
                            f"-o {destination / 'artifact'}")


def refuse_concurrent_writer(destination: Path, ours: Path) -> None:
    """Another live compile's staging directory for the same destination (one whose lock is held): refuse,
    so that two compiles to one ``-o`` cannot both report success while the later silently wins. Checked
    after our own staging directory is locked, so of two compiles that start at the same moment at least one
    sees the other (both may refuse; neither overwrites the other). Without ``flock`` (Windows) liveness is a
    day's age, which would block an ``-o`` a killed compile used, so nothing is refused there."""
    if fcntl is None:
        return
    for path in leftovers(destination):
        if path == ours or ".tmp-" not in path.name:
            continue
        with _unless_live(path) as stale:
            if not stale and path.exists():
                raise ArtifactError(f"another ditq compile is writing {destination} now (its work directory "
                                    f"{path.name} is locked); wait for it to finish or choose another -o")


def require_free_space(directory: Path, needed_bytes: int, what: str) -> None:
    """Refuse before the work when the file system of ``directory`` has less free space than ``needed_bytes``
    (a lower bound of what will be written, so a refusal is never wrong)."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return  # cannot tell: the write itself reports a full disk
    if free < needed_bytes:
        raise WriteError(f"not enough free disk space for {what} in {directory.parent}: {free / 1e6:.1f} MB free, "
                         f"it needs at least {needed_bytes / 1e6:.1f} MB; free space or choose another -o")


def _make_parents(directory: Path, created: list[Path]) -> None:
    """``mkdir -p directory``, appending to ``created`` (outermost first) each directory this call made: on a
    failure part way, the caller still knows what to remove; one another process made meanwhile is not ours."""
    missing = []
    for path in [directory, *directory.parents]:
        if path.exists():
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        created.append(path)


def _remove_created(created: list[Path]) -> None:
    """Remove the parent directories a failed compile created, innermost first, only while empty."""
    for path in reversed(created):
        try:
            os.rmdir(path)
        except OSError:
            return


def _random_suffix() -> str:
    return "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(_SUFFIX_LENGTH))


def _create_locked_staging(destination: Path) -> tuple[Path, int | None]:
    """mkdir (with the umask) then lock; a cleaner that removed it in between makes us take another name."""
    for _ in range(100):
        staging = destination.parent / f".{destination.name}.tmp-{_random_suffix()}"
        try:
            os.mkdir(staging, 0o777)
        except FileExistsError:
            continue
        if fcntl is None:  # no flock (Windows): liveness is the directory's age, nothing to hold
            return staging, None
        try:
            fd = os.open(staging, os.O_RDONLY)
        except OSError:
            os.rmdir(staging)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock: nothing of ours may stay behind
            os.close(fd)
            os.rmdir(staging)
            raise
        if _is_same_directory(fd, staging):
            return staging, fd
        os.close(fd)
    raise FileExistsError(errno.EEXIST, "no free staging name", str(destination.parent))


def _is_same_directory(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _sync_tree(directory: Path) -> None:
    """Flush file contents and the directory entry before a rename makes them visible."""
    for file in directory.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the data itself was synced
    finally:
        os.close(fd)


def _replace(staging: Path, destination: Path) -> None:
    """Put ``staging`` at ``destination``; what was there ends at ``staging`` (removed by the caller)."""
    if not destination.exists():
        os.rename(staging, destination)
    elif not exchange(staging, destination):
        backup = destination.parent / f".{destination.name}.old-{_random_suffix()}"
        os.rename(destination, backup)
        try:
            os.rename(staging, destination)  # a kill before this line: recover_interrupted_replace undoes it
        except OSError:
            os.rename(backup, destination)  # an error (not a kill): put the old artifact back at once
            raise
        os.rename(backup, staging)
    _fsync_directory(destination.parent)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2(RENAME_EXCHANGE)``; False where that is unavailable
    (another OS, an old kernel or C library, a file system without support), so the caller falls back."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


_RENAMEAT2 = None


def _renameat2():
    global _RENAMEAT2
    if _RENAMEAT2 is None:
        try:
            function = ctypes.CDLL(None, use_errno=True).renameat2
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            function.restype = ctypes.c_int
            _RENAMEAT2 = function
        except (OSError, AttributeError, TypeError):
            _RENAMEAT2 = False
    return _RENAMEAT2 or None


# ---------------------------------------------------------------------------------------------
# Leftovers of killed compiles
# ---------------------------------------------------------------------------------------------

def leftover_pattern(destination: Path) -> re.Pattern:
    """ditq's own naming for siblings of ``destination``: nothing else is ever removed."""
    return re.compile(rf"\.{re.escape(destination.name)}\.(tmp|old)-[{_SUFFIX_ALPHABET}]{{{_SUFFIX_LENGTH}}}")


def leftovers(destination: Path) -> list[Path]:
    pattern = leftover_pattern(destination)
    try:
        return sorted(p for p in destination.parent.iterdir() if pattern.fullmatch(p.name) and not p.is_symlink())
    except OSError:
        return []


def remove_stale_staging(destination: Path) -> list[Path]:
    """Remove the leftovers of killed compiles beside ``destination``: only ditq's naming, only directories
    no live compile holds, only if they hold nothing but artifact files. Returns what was removed."""
    removed = []
    for path in leftovers(Path(destination)):
        with _unless_live(path) as stale:
            if stale and _holds_only_artifact_files(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def recover_interrupted_replace(destination: Path) -> Path | None:
    """Where a fallback replacement was killed between its two renames, the destination is missing and the
    previous artifact waits at ``.NAME.old-*``: rename it back. Returns the restored path, if any."""
    destination = Path(destination)
    if destination.exists() or destination.is_symlink():
        return None
    backups = [p for p in leftovers(destination) if ".old-" in p.name]
    if len(backups) != 1:
        return None  # none, or ambiguous: leave them for a person to look at
    backup = backups[0]
    with _unless_live(backup) as stale:
        if stale and is_artifact_directory(backup) and any(backup.iterdir()):
            try:
                os.rename(backup, destination)
            except OSError:
                return None
            return destination
    return None


@contextmanager
def _unless_live(path: Path) -> Iterator[bool]:
    """Yield whether ``path`` is stale, holding its lock meanwhile so no compile can start using it."""
    if fcntl is None:
        try:
            stale = time.time() - path.stat().st_mtime > _STALE_AGE_WITHOUT_LOCKS
        except OSError:
            stale = False
        yield stale
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stale = True
        except OSError:
            stale = False  # a live compile holds it
        yield stale
    finally:
        os.close(fd)


def _holds_only_artifact_files(path: Path) -> bool:
    try:
        return path.is_dir() and all(e.name in KNOWN_FILES and e.is_file(follow_symlinks=False)
                                     for e in os.scandir(path))
    except OSError:
        return False
