"""Writing run files so that a failed write loses nothing and says why in one line.

Every file is written to ``<name>.tmp-<pid>``, fsynced and renamed (the old file stays until the new
one is complete); a write that fails (disk full, read-only folder, file-size limit) removes its
temporary file and becomes a ``WriteError`` naming the file and the OS error. Data is serialized in
memory first (``torch_bytes``): ``torch.save`` on a full disk fails inside its zip writer with an
error that never says the disk is full.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os

import torch

TMP = ".tmp-"


class WriteError(RuntimeError):
    """A run file could not be written; the message is the one line the user sees.

    `collective`: every rank raises it (the ranks agreed on it, ``agree``), so no rank needs to be
    aborted; otherwise only the rank that wrote knows, and the others must be ended."""

    def __init__(self, message: str, collective: bool = False):
        super().__init__(message)
        self.collective = collective


def os_error_text(e: OSError) -> str:
    """'No space left on device (ENOSPC)'."""
    name = errno.errorcode.get(e.errno or 0)
    return f"{e.strerror or e}" + (f" ({name})" if name else "")


def write_error(path: str, e: OSError) -> WriteError:
    return WriteError(f"cannot write {path}: {os_error_text(e)}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def torch_bytes(obj) -> bytes:
    """``torch.save`` into memory; the file write that follows fails with the real OS error."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out: a short write (disk nearly full) is followed by the error."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, verify: bool = False) -> None:
    """Replace `path` by `data` or leave it as it was; with `verify`, the written bytes are read
    back (size and SHA-256) before the rename. Raises WriteError; no temporary file stays."""
    tmp = f"{path}{TMP}{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if verify and (os.path.getsize(tmp) != len(data) or file_digest(tmp) != sha256(data)):
            raise OSError(errno.EIO, "the file read back differs from the bytes written")
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise write_error(path, e) from None


def remove_temporaries(folder: str) -> None:
    """Remove the temporary files a killed process left in `folder` (call where no one writes)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if TMP in name:
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def holds_files(folder: str) -> bool:
    """True when `folder` exists and holds anything but temporary files."""
    return os.path.isdir(folder) and any(TMP not in name for name in os.listdir(folder))


def attempt(write) -> WriteError | None:
    """Run `write()`; its WriteError is returned, for ``agree``."""
    try:
        write()
    except WriteError as e:
        return e
    return None


def agree(comm, error: WriteError | None) -> None:
    """Collective: if any rank's write failed, every rank raises the first such error (lowest rank),
    so the whole job ends with the same line and exit code."""
    messages = comm.allgather_object(None if error is None else str(error))
    first = next((m for m in messages if m), None)
    if first is not None:
        raise WriteError(first, collective=True)
