"""Atomic file and folder writes, so an interrupted run never leaves a half-written output behind."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]

# A full disk, or a full quota: the user frees space or writes elsewhere.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class RMTKDDiskFullError(OSError):
    """A write ran out of space; the message names the folder and the fix, `__cause__` keeps the system's error."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def _disk_full(error: BaseException, target: Path) -> Optional[RMTKDDiskFullError]:
    """The one-line error for `error` when it is a full disk (or quota) while writing `target`, else None.

    A full disk met inside `atomic_directory` (already an `RMTKDDiskFullError` naming a temporary file) is named
    again after the folder being written.
    """
    if not (isinstance(error, OSError) and error.errno in _NO_SPACE):
        return None
    return RMTKDDiskFullError(
        f"No space left on the device while writing {str(target)!r}; the partial write was removed: free space on "
        "that disk, or choose an output folder on another disk."
    )


def _umask_mode(directory: bool) -> int:
    """The mode a plain `open`/`mkdir` would give under the current umask (`mkstemp`/`mkdtemp` force 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace` it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:  # no room even for an empty file (no free inode, a full quota)
        full = _disk_full(error, path)
        if full is not None:
            raise full from error
        raise
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _umask_mode(directory=False))
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = _disk_full(error, path)
        if full is not None:
            raise full from error
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


def check_output_folder(
    output: PathLike,
    inputs: Iterable[Any] = (),
    *,
    overwrite: Optional[bool] = False,
    name: str = "save_directory",
    allowed: Iterable[PathLike] = (),
    what: str = "model",
    cli: Optional[bool] = None,
) -> Path:
    """The one guard of every folder optimum-rmtkd writes, run before any work: refuse an output that would delete
    or mix with an input model, a file, and (unless `overwrite`) a non-empty folder.

    Args:
        output (`str` or `os.PathLike`): the folder about to be written.
        inputs (`Iterable`, *optional*): the input models (folders; Hub ids, paths that do not exist and anything
            not a path, such as `None` or a `datasets.Dataset`, are skipped). `output` must be none of them, none of
            their parents (replacing it would delete the input) and not inside one (writing there would mix with the
            input model's files).
        overwrite (`bool`, *optional*, defaults to `False`): `False` refuses a non-empty `output`; `True` lets it
            be replaced; `None` skips that check, for writers that add files to a folder (benchmark, model card).
        name (`str`, *optional*, defaults to `"save_directory"`): the argument or flag named in the messages
            (`--output` on the command line).
        allowed (`Iterable`, *optional*): folders inside an input that their writer owns, allowed as they are
            (`rmtkd export`'s `<model_dir>/onnx`).
        what (`str`, *optional*, defaults to `"model"`): what the inputs are, for the message (`"dataset"`).
        cli (`bool`, *optional*): whether the fix to name is the `--overwrite` flag rather than `overwrite=True`;
            defaults to whether `name` is a flag (starts with `--`).

    Returns:
        `Path`: `output` as a `Path`.
    """
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"`{name}` {str(output)!r} is a file, not a folder; pass a folder path.")
    allowed = [Path(folder).expanduser() for folder in allowed]
    for source in inputs:
        # A Hub id, a `datasets.Dataset` or a model object is nothing this write could touch.
        if not isinstance(source, (str, os.PathLike)) or not Path(source).expanduser().exists():
            continue
        source = Path(source).expanduser()
        if any(path.resolve() == folder.resolve() for folder in allowed):
            continue
        if is_same_or_inside(source, path) or is_same_or_inside(path, source):
            raise ValueError(
                f"`{name}` {str(output)!r} is the input {what} {str(source)!r}, one of its parents or a folder inside "
                f"it; writing there would delete or mix with the input {what}: choose another folder."
            )
    if overwrite is False and path.is_dir() and any(path.iterdir()):
        flag = "--overwrite" if (name.startswith("--") if cli is None else cli) else "`overwrite=True`"
        raise FileExistsError(
            f"`{name}` {str(output)!r} exists and is not empty; choose another folder or pass {flag} to replace it."
        )
    return path


@contextlib.contextmanager
def atomic_directory(final_dir: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final_dir` that replaces it only when the block succeeds.

    A reader never sees a half-written model folder; with `overwrite=False` an existing, non-empty `final_dir`
    is an error rather than silently replaced. A full disk (or quota) while the block writes is an
    `RMTKDDiskFullError` naming the folder, and the temporary folder is removed.
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
    except BaseException as error:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        full = _disk_full(error, final_dir)
        if full is not None:
            raise full from error
        raise
