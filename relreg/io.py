"""File output: atomic writes and writability checks (the bottom of the import graph).

Every file relreg writes (heatmaps, raw maps, figures, reports) goes through :func:`atomic_write`:
the content is written to a temporary file in the target's folder and renamed into place, which
replaces the target in one step on POSIX and Windows file systems. :func:`check_writable` lets a
command fail before its work, not after it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "check_writable"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)``, then rename the temporary file to ``path``.

    The folder is created if needed; the file gets the permissions a plain ``open(path, "w")``
    would give (``mkstemp``'s are owner-only). If ``write`` raises, the temporary file is removed
    and ``path`` is left as it was; a full disk is an ``OSError`` that names the path, the bytes
    written before the disk filled and the bytes free.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> import json, tempfile
        >>> out = Path(tempfile.mkdtemp()) / "report.json"
        >>> atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps({"a": 1}))).read_text()
        '{"a": 1}'
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=out.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        free = shutil.disk_usage(out.parent).free
        kept = "the previous file is intact" if out.exists() else "nothing was written"
        raise OSError(
            err.errno,
            f"No space left on device while writing {str(out)!r} (it needs more than "
            f"{written:,} bytes; {free:,} bytes are free there); {kept}.",
        ) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def check_writable(out: str | os.PathLike, what: str = "output directory") -> None:
    """Create the directory ``out`` if needed, then write and delete a probe file in it.

    Args:
        out: the directory.
        what: names the directory in the error, e.g. ``"trainer.default_root_dir"``.

    Raises:
        ValueError: ``out`` cannot be created or written, naming ``what``, the path and the cause.

    Example:
        >>> import tempfile
        >>> check_writable(Path(tempfile.mkdtemp()) / "runs")
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"Expected a writable {what}, but {str(out)!r} is not: {err}") from err
