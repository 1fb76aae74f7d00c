"""Crash-safe exports: write into a hidden sibling folder, publish only when it is complete.

An export of ``DEST`` (``PARENT/NAME``) goes through hidden siblings of ``DEST``,
named ``PARENT/.NAME.st3-export-<state>.<host>.<pid>`` (``<host>``: the host
name with every character outside ``[A-Za-z0-9-]`` replaced by ``-``;
``<pid>``: the writing process):

1. ``tmp`` – every file is written here (then fsync'ed); a crash leaves only
   this folder, which nobody reads and the next export deletes;
2. ``new`` – the ``tmp`` folder renamed once complete: the commit point.  From
   here on the new export exists, whole, on disk;
3. publish, either

   * **swap** (``DEST`` missing, or holding nothing but export files): rename
     ``DEST`` to ``old``, rename ``new`` to ``DEST``, delete ``old``.  The
     previous export stays whole (as ``DEST``, then as ``old``) until the new
     one is in place; or
   * **in place** (``DEST`` also holds other files, e.g. a training run folder
     with ``checkpoints/`` and ``logs/``, which must not move): hard-link (or
     copy) each file of ``new`` into ``DEST`` as
     ``.FILE.st3-export-part.<host>.<pid>`` and ``os.replace`` it onto ``FILE``,
     ``config.json`` last; then delete ``new``.

Readers (:func:`readable_export`) use a ``new`` sibling when one exists (it is
complete, ``DEST`` may be mid-publish), else ``DEST``, else an ``old`` left by a
crash between the two renames.  :func:`recover` (run by every export before it
writes) finishes what a dead writer left: deletes ``tmp`` and ``part`` files,
publishes the newest ``new``, renames an ``old`` back when ``DEST`` is missing,
deletes the rest.  A writer counts as dead when it ran on this host and its pid
is gone, or ran elsewhere more than :data:`FOREIGN_STALE_S` seconds ago.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Union

from ..errors import OutputDirError
from .errors import describe_cause

PathLike = Union[str, os.PathLike]

MARK = "st3-export"
TMP, NEW, OLD, PART = "tmp", "new", "old", "part"
FOREIGN_STALE_S = 3600.0  # an export never takes an hour: older artifacts of another host are dead
LAST_FILES = ("model.safetensors", "config.json")  # published last, config.json very last (timm reads it first)


def host_tag() -> str:
    """This host's name as it appears in artifact names (only ``[A-Za-z0-9-]``)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A hidden folder (or, for ``part``, file) left by an export of some destination."""

    path: Path
    state: str
    host: str
    pid: int

    def writer_alive(self) -> bool:
        """Whether the process that wrote this may still be writing (then nobody else touches it)."""
        # on Windows os.kill(pid, 0) would send CTRL_C_EVENT, not probe: judge by age there too
        if self.host != host_tag() or os.name == "nt":
            try:
                return time.time() - self.path.lstat().st_mtime < FOREIGN_STALE_S
            except FileNotFoundError:
                return False
        if self.pid == os.getpid():
            return False  # this process is not exporting while it looks (exports are not reentrant)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, owned by another user
        return True


def artifact_path(destination: Path, state: str) -> Path:
    """``PARENT/.NAME.st3-export-<state>.<host>.<pid>`` for this process."""
    return destination.parent / f".{destination.name}.{MARK}-{state}.{host_tag()}.{os.getpid()}"


def _parse(path: Path, prefix: str, states: Iterable[str]) -> Optional[Artifact]:
    match = re.fullmatch(re.escape(prefix) + rf"({'|'.join(states)})\.([A-Za-z0-9-]+)\.(\d+)", path.name)
    if not match:
        return None
    return Artifact(path, match.group(1), match.group(2), int(match.group(3)))


def artifacts(destination: PathLike) -> List[Artifact]:
    """The ``tmp`` / ``new`` / ``old`` siblings of ``destination``, oldest first."""
    destination = _absolute(destination)
    if not destination.parent.is_dir():
        return []
    prefix = f".{destination.name}.{MARK}-"
    found = []
    for path in destination.parent.glob(glob_escape(prefix) + "*"):
        artifact = _parse(path, prefix, (TMP, NEW, OLD))
        if artifact is not None:
            found.append(artifact)
    return sorted(found, key=_mtime)


def _parts(destination: Path) -> List[Artifact]:
    """``part`` files a publish in place left inside ``destination``."""
    if not destination.is_dir():
        return []
    found = []
    for path in destination.glob(f".*.{MARK}-{PART}.*"):
        name = path.name
        file_name = name[1:name.index(f".{MARK}-{PART}.")]
        artifact = _parse(path, f".{file_name}.{MARK}-", (PART,))
        if artifact is not None:
            found.append(artifact)
    return found


def readable_export(destination: PathLike) -> Path:
    """Where a reader finds the newest complete export of ``destination`` (``destination`` itself normally)."""
    destination = _absolute(destination)
    found = artifacts(destination)
    committed = [a.path for a in found if a.state == NEW]
    if committed:
        return committed[-1]  # whole; destination may be half-way through an in-place publish
    if not destination.exists():
        backups = [a.path for a in found if a.state == OLD]
        if backups:
            return backups[-1]  # a crash between "destination -> old" and "new -> destination"
    return destination


def recover(destination: PathLike) -> None:
    """Finish or undo what a dead export of ``destination`` left behind (see the module docstring)."""
    destination = _absolute(destination)
    dead = [a for a in artifacts(destination) if not a.writer_alive()]
    for artifact in dead:
        if artifact.state == TMP:
            shutil.rmtree(artifact.path, ignore_errors=True)
    for part in _parts(destination):
        if not part.writer_alive():
            with contextlib.suppress(FileNotFoundError):
                part.path.unlink()
    committed = [a for a in dead if a.state == NEW]
    if committed:
        for stale in committed[:-1]:
            shutil.rmtree(stale.path, ignore_errors=True)
        publish(committed[-1].path, destination)  # roll forward: it was complete
    backups = [a for a in dead if a.state == OLD]
    if backups and not destination.exists():
        os.rename(backups[-1].path, destination)  # roll back: the crash left no export in place
        backups = backups[:-1]
    for backup in backups:
        shutil.rmtree(backup.path, ignore_errors=True)


@dataclasses.dataclass
class Staging:
    """The folder an export writes into, and how it will be published."""

    folder: Path
    destination: Path
    in_place: bool  # True: file by file into a destination holding other files; False: folder swap


@contextlib.contextmanager
def staged(destination: PathLike) -> Iterator[Staging]:
    """Yield an empty staging folder; on normal exit publish it as ``destination``, on error delete it.

    Recovery of a dead export runs first, then the publish mode is fixed
    (:func:`can_swap`).  Errors of the file system (no space, no permission)
    come out as :class:`~st3_hf.errors.OutputDirError`; ``destination`` then
    still holds its previous export, whole.
    """
    destination = _absolute(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        recover(destination)
        staging = Staging(artifact_path(destination, TMP), destination, in_place=not can_swap(destination))
        shutil.rmtree(staging.folder, ignore_errors=True)
        staging.folder.mkdir()
    except OSError as e:
        raise _output_error(destination, e) from e
    try:
        yield staging
        fsync_tree(staging.folder)
        committed = artifact_path(destination, NEW)
        os.rename(staging.folder, committed)  # the commit point
    except BaseException as e:
        shutil.rmtree(staging.folder, ignore_errors=True)
        if isinstance(e, OSError) and _is_write_error(e):
            raise _output_error(destination, e) from e
        raise
    try:
        publish(committed, destination, in_place=staging.in_place)
    except OSError as e:
        raise OutputDirError(
            f"publishing the export to {destination} failed ({describe_cause(e)}); the complete new export is in "
            f"{committed} and is published by the next export, or move it to {destination} by hand"
        ) from e


def can_swap(destination: Path) -> bool:
    """Whether ``destination`` may be replaced as a whole: absent, or a plain folder of export files only."""
    from .export import EXPORT_FILES

    if destination.is_symlink():
        return False  # replacing the link by a folder would surprise whoever made it
    if not destination.exists():
        return True
    if not destination.is_dir():
        return False
    cwd = Path.cwd().resolve()
    if cwd == destination.resolve() or destination.resolve() in cwd.parents:
        return False  # renaming it would pull the working directory away
    return all(child.is_file() and child.name in EXPORT_FILES for child in destination.iterdir())


def publish(committed: Path, destination: Path, in_place: Optional[bool] = None) -> None:
    """Make the complete export in ``committed`` the one at ``destination``, then delete ``committed``."""
    if in_place is None:
        in_place = not can_swap(destination)
    if not in_place and can_swap(destination):
        _swap(committed, destination)
    else:
        _publish_in_place(committed, destination)


def _swap(committed: Path, destination: Path) -> None:
    if not destination.exists():
        os.rename(committed, destination)
        fsync_dir(destination.parent)
        return
    backup = artifact_path(destination, OLD)
    shutil.rmtree(backup, ignore_errors=True)
    os.rename(destination, backup)
    try:
        os.rename(committed, destination)
    except OSError:
        with contextlib.suppress(OSError):
            os.rename(backup, destination)  # put the previous export back; committed stays for recovery
        raise
    fsync_dir(destination.parent)
    shutil.rmtree(backup, ignore_errors=True)


def _publish_in_place(committed: Path, destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in committed.iterdir() if p.is_file())
    names.sort(key=lambda n: LAST_FILES.index(n) + 1 if n in LAST_FILES else 0)
    for name in names:
        part = destination / f".{name}.{MARK}-{PART}.{host_tag()}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        try:
            os.link(committed / name, part)  # committed keeps its copy: readers and recovery still see it whole
        except OSError:
            shutil.copyfile(committed / name, part)
            fsync_file(part)
        os.replace(part, destination / name)
    fsync_dir(destination)
    shutil.rmtree(committed, ignore_errors=True)


# ---------------------------------------------------------------------------- helpers
def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (a power cut after the commit rename must not leave empty files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file directly in ``folder``, then ``folder`` itself."""
    for path in folder.iterdir():
        if path.is_file():
            fsync_file(path)
    fsync_dir(folder)


def glob_escape(text: str) -> str:
    """``text`` with glob wildcards escaped (a folder named ``run[1]`` must match itself only)."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _absolute(path: PathLike) -> Path:
    # abspath, not resolve: a symlinked destination is published through the link, not at its target
    return Path(os.path.abspath(os.fspath(path)))


def _mtime(artifact: Artifact) -> float:
    try:
        return artifact.path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0


_WRITE_ERRNOS = {"ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EFBIG", "EIO", "EXDEV"}


def _is_write_error(error: OSError) -> bool:
    import errno

    if isinstance(error, OutputDirError):
        return False  # already says what to do
    return any(error.errno == getattr(errno, name, None) for name in _WRITE_ERRNOS)


def _output_error(destination: Path, error: OSError) -> OutputDirError:
    return OutputDirError(
        f"cannot write the export next to {destination} ({describe_cause(error)}); any previous export there "
        "is unchanged: free disk space, fix the permissions or choose another output folder"
    )
