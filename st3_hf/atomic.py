"""Publish a folder atomically: write into a temporary sibling, fsync, commit by rename (stdlib only).

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_directory(root / "out") as tmp:
    ...     _ = (tmp / "config.json").write_text("{}")
    >>> sorted(p.name for p in (root / "out").iterdir())
    ['config.json']

A missing destination is committed by one rename of the whole folder.  An existing one (a run
folder that also holds ``checkpoints/``, which must not move) receives the files one rename each,
with ``last`` (``config.json``: what timm and :func:`st3_hf.from_pretrained` read first) removed
before the first and renamed in after the last, so no moment shows a folder that reads as a model
mixing two writes.  A kill while writing leaves the destination untouched and a temporary sibling
that the next write of that destination deletes; writes of one destination are not concurrent.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Union

PathLike = Union[str, os.PathLike]
TMP_MARK = ".st3-tmp-"


def temp_siblings(destination: PathLike) -> list:
    """The temporary folders that writes of ``destination`` left next to it (a killed write leaves one)."""
    destination = Path(os.path.abspath(destination))
    prefix = f".{destination.name}{TMP_MARK}"
    return (sorted(p for p in destination.parent.iterdir() if p.name.startswith(prefix))
            if destination.parent.is_dir() else [])


@contextlib.contextmanager
def atomic_directory(destination: PathLike, *, last: str = "config.json", stale: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``destination``; on normal exit fsync and commit it, on error delete it.

    ``stale`` names files of an earlier write that the new one replaces even when it does not write them
    (removed from an existing destination at the commit); other files there are left alone.
    """
    # abspath, not resolve: a symlinked destination is written through the link
    destination = Path(os.path.abspath(destination))
    destination.parent.mkdir(parents=True, exist_ok=True)
    for leftover in temp_siblings(destination):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}{TMP_MARK}", dir=destination.parent))
    try:
        yield tmp
        honour_umask(tmp)
        for path in [*(p for p in tmp.iterdir() if p.is_file()), tmp]:
            _fsync(path)
        if not destination.exists():
            os.rename(tmp, destination)  # the commit: one rename
        else:
            _move_files_into(tmp, destination, last, stale)
        _fsync(destination.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def honour_umask(folder: Path) -> None:
    """Give ``folder`` and what it holds the modes of the process umask, as ``open``/``mkdir`` would: mkdtemp
    made it 0700 and mkstemp-style writers leave 0600 files, which teammates on a shared server cannot read."""
    os.umask(umask := os.umask(0o022))  # reading the umask means setting it: put straight back
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _move_files_into(tmp: Path, destination: Path, last: str, stale: Iterable[str]) -> None:
    written = sorted(p.name for p in tmp.iterdir())
    with contextlib.suppress(FileNotFoundError):
        (destination / last).unlink()  # from here until the end the folder reads as no model at all
    for name in set(stale) - set(written):
        with contextlib.suppress(FileNotFoundError):
            (destination / name).unlink()
    for name in sorted(written, key=lambda n: n == last):
        os.replace(tmp / name, destination / name)
    _fsync(destination)


def _fsync(path: Path) -> None:
    """Flush a file's data or a folder's entries to disk (a power cut after the rename must not leave empty files)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # folders cannot be opened on some systems
    with contextlib.suppress(OSError):  # some file systems refuse fsync on folders
        os.fsync(fd)
    os.close(fd)
