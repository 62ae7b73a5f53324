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


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Serialise `obj` as indented JSON and write it atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
