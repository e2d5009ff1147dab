"""Atomic writes: a reader sees the old file or the new one, never half of one.

A write that the machine refuses (a full disk, the file-size limit, permission or a writable
mount lost mid-run) raises :class:`~robustness.errors.WriteError`, naming the folder and what ran
out; the temporary file is removed and the file it would have replaced is untouched. Tensors are
serialised in memory first and then written with plain writes, so that the operating system's
reason (``errno``) reaches us instead of torch's zip writer's "unexpected pos".
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from robustness.errors import WriteError

# What ran out, and what to do about it, for each reason a write can be refused.
_REFUSALS = {
    errno.ENOSPC: ("the file system is full", "free space there (or point the run elsewhere) and run the same command again"),
    errno.EDQUOT: ("your disk quota there is used up", "free space within your quota (or point the run elsewhere) and run the same command again"),
    errno.EFBIG: ("the file is larger than this process may write (the file-size limit, `ulimit -f`)",
                  "raise the limit (`ulimit -f unlimited`) and run the same command again"),
    errno.EACCES: ("permission to write there was denied", "make the folder writable for this user again (or point the run elsewhere)"),
    errno.EPERM: ("the operation was not permitted", "make the folder writable for this user again (or point the run elsewhere)"),
    errno.EROFS: ("the file system is mounted read-only", "remount it writable (or point the run elsewhere) and run the same command again"),
    errno.EIO: ("the device reported an input/output error", "check the disk (dmesg), then run the same command again"),
}


def write_error(exc: OSError, path: Path) -> WriteError | None:
    """Our error for a write to ``path`` the machine refused, or None for other failures."""
    refusal = _REFUSALS.get(exc.errno or 0)
    if refusal is None:
        return None
    what, fix = refusal
    return WriteError(f"cannot write {path.name} in {path.parent}: {what} ({errno.errorcode.get(exc.errno, exc.errno)}: {os.strerror(exc.errno)}); "
                      "files written before are unchanged", fix)


def _atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        # mkstemp creates 0600 files; a shared store must be readable as the user's umask allows.
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only mount keeps it; a dot-named .tmp file is never read as a result
        ours = write_error(exc, path) if isinstance(exc, OSError) else None
        if ours is not None:
            raise ours from None
        raise
    return path


def _write_all(tmp: Path, data: bytes | memoryview) -> None:
    with open(tmp, "wb") as handle:
        handle.write(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic(path, lambda tmp: _write_all(tmp, data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically; the format comes from ``path``'s suffix."""
    fmt = Path(path).suffix.lstrip(".")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, **kwargs)
    return atomic_write_bytes(path, buffer.getbuffer())


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # tensors and numpy arrays
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def path_length_problem(path: Path) -> str | None:
    """Why this file system cannot hold ``path`` and the folders a run makes below it, or None.

    Judged on the text first: asking the file system about an over-long name fails itself.
    """
    existing = path
    while existing != existing.parent:
        try:
            if existing.exists():
                break
        except OSError:
            pass
        existing = existing.parent
    try:
        name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            return f"it holds a folder name of {len(os.fsencode(part))} bytes ('{part[:32]}...'), and this file system allows {name_max}"
    # Room for what a run adds below it: experiment, date and time, store entries named by 64-digit fingerprints.
    if len(os.fsencode(str(path))) + 256 > path_max:
        return f"it is {len(os.fsencode(str(path)))} bytes long, and with the folders a run makes below it, paths would pass this file system's limit of {path_max}"
    return None
