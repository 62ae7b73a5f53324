"""Atomic file and folder writes, so an interrupted run never leaves a half-written output behind."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, os.PathLike]


def _umask_mode(directory: bool) -> int:
    """The mode a plain `open`/`mkdir` would give under the current umask (`mkstemp`/`mkdtemp` force 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _umask_mode(directory=False))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Serialise `obj` as indented JSON and write it atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def is_same_or_inside(path: PathLike, folder: PathLike) -> bool:
    """Whether `path` is `folder` or lies below it (after resolving links): replacing `folder` would delete it."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


@contextlib.contextmanager
def atomic_directory(final_dir: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final_dir` that replaces it only when the block succeeds.

    A reader never sees a half-written model folder; with `overwrite=False` an existing, non-empty `final_dir`
    is an error rather than silently replaced.
    """
    final_dir = Path(final_dir)
    if final_dir.exists() and any(final_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"`save_directory` {str(final_dir)!r} exists and is not empty; choose another folder or pass `overwrite=True`."
        )
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{final_dir.name}.", suffix=".tmp"))
    os.chmod(tmp_dir, _umask_mode(directory=True))
    try:
        yield tmp_dir
        if final_dir.exists():
            backup = final_dir.with_name(f".{final_dir.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(final_dir, backup)
            os.replace(tmp_dir, final_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
