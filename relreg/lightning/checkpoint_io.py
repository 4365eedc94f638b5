"""Checkpoints that a failed or killed write never damages, on any file system.

Lightning's default ``TorchCheckpointIO`` saves through ``_atomic_save``: a temporary file in the
system temp directory, then a move, which is a copy (not an atomic rename) whenever the checkpoint
directory is on another file system, so a full disk or a kill half-way leaves a truncated target.
:class:`AtomicCheckpointIO` writes the temporary file in the target's own directory, flushes and
fsyncs it, and ``os.replace``-s it over the target: the target is either the old file or the whole
new one. A write that fails (no space left, quota, I/O error) removes its temporary file and raises
:class:`CheckpointWriteError`, naming the path, the bytes the checkpoint needs and the bytes free.
Temporary files left by a killed process are removed the first time a directory is written to.
Beside each checkpoint a ``<name>.sha256`` file records the digest and size of what was written,
so that a checkpoint damaged later on disk (a flipped bit loads silently with ``torch.load``) is
recognised before a resume (:func:`relreg.lightning.resume.check_checkpoint`).

``relreg fit|validate|test|predict`` use it unless the config chooses another checkpoint IO.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from relreg.io import atomic_write

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointWriteError",
    "checkpoint_bytes",
    "digest_path",
    "read_digest",
]

TMP_MARK = ".relreg-tmp"
"""Infix of the temporary files (``.<name>.relreg-tmp<random>``), so stale ones can be found."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous file at the path is intact."""


class _CountingSink:
    """A write-only file object that counts bytes and keeps none."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def checkpoint_bytes(checkpoint: dict[str, Any]) -> int:
    """The size ``torch.save`` writes for ``checkpoint``, computed without keeping the bytes."""
    sink = _CountingSink()
    torch.save(checkpoint, sink)
    return sink.size


def _open_for_write(path: str) -> Any:
    """The binary file the checkpoint is written to (tests replace it to inject faults)."""
    return open(path, "wb")


class _HashingWriter:
    """Writes through to ``stream`` and keeps the SHA-256 and size of what was written."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        written = self.stream.write(data)
        self.sha.update(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        self.stream.flush()


def digest_path(path: str | os.PathLike) -> Path:
    """The file that records the digest of the checkpoint at ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def read_digest(path: str | os.PathLike) -> tuple[str, int] | None:
    """``(sha256 hex, size)`` recorded for ``path``, or None if there is no current record (none
    written, or one older than the checkpoint: a kill between the two writes)."""
    record = digest_path(path)
    try:
        if record.stat().st_mtime_ns < Path(path).stat().st_mtime_ns:
            return None
        digest, size = record.read_text().split()
        return digest, int(size)
    except (OSError, ValueError):
        return None


def file_digest(path: str | os.PathLike) -> tuple[str, int]:
    """``(sha256 hex, size)`` of a file, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a killed write left in ``directory``; returns them."""
    removed = []
    for path in Path(directory).glob(f".*{TMP_MARK}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with same-directory temporary files, fsync and ``os.replace``.

    Remote paths (``s3://``, ...) are handed to Lightning's own saving. Loading is Lightning's.

    Example:
        >>> import pytorch_lightning as pl
        >>> trainer = pl.Trainer(plugins=[AtomicCheckpointIO()], logger=False)  # doctest: +SKIP
    """

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set[str] = set()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically.

        Raises:
            CheckpointWriteError: the write failed; names the path, the bytes needed and free.
        """
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(
                f"Expected no storage_options for a local path, but got {storage_options!r}."
            )
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if str(target.parent) not in self._cleaned:
            remove_stale_temporaries(target.parent)
            self._cleaned.add(str(target.parent))
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TMP_MARK}")
        os.close(fd)
        try:
            with _open_for_write(tmp) as stream:
                writer = _HashingWriter(stream)
                torch.save(checkpoint, writer)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, target)
            _fsync_directory(target.parent)
            record = f"{writer.sha.hexdigest()} {writer.size}\n"
            atomic_write(digest_path(target), lambda t: Path(t).write_text(record))
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            cause = _os_error(err)
            if cause is None:
                raise
            raise _write_error(cause, target, checkpoint) from err

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        """Remove a checkpoint and its digest record."""
        super().remove_checkpoint(path)
        if "://" not in str(path):
            digest_path(path).unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error(err: BaseException) -> OSError | None:
    """The ``OSError`` behind ``err``: torch's zip writer re-raises a failed write as a
    ``RuntimeError`` from its clean-up, with the ``OSError`` as its context."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _write_error(err: OSError, target: Path, checkpoint: dict[str, Any]) -> CheckpointWriteError:
    needed = checkpoint_bytes(checkpoint)
    free = shutil.disk_usage(target.parent).free
    kept = "the previous file is intact" if target.exists() else "no file was written"
    disk_full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "no space left on device" if disk_full else err.strerror
    return CheckpointWriteError(
        err.errno,
        f"Could not write checkpoint {str(target)!r}: {reason} (it needs {needed:,} bytes; "
        f"{free:,} bytes are free there); {kept}. Free space or choose another "
        "ModelCheckpoint dirpath, then resume with --ckpt_path last.",
    )
