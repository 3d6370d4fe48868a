"""Small records that must survive a crash of the daemon at any instant
(the frozen-PID journal, the in-doubt records): written whole under a
temporary name, fsynced, renamed into place, the directory fsynced.  After
a crash a record is either complete or absent; a leftover temporary file
means the rename, and what it guarded, never happened."""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_record(final: str, data: bytes, tmp: str) -> None:
    """Write ``data`` to ``final`` durably through ``tmp`` (same directory).
    Raises OSError; the temporary file is gone then."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        fsync_dir(os.path.dirname(final))
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
