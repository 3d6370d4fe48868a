"""Small records that must survive a crash of the daemon at any instant
(the frozen-PID journal, the in-doubt records): written whole under a
temporary name, fsynced, renamed into place, the directory fsynced.  After
a crash a record is either complete or absent; a leftover temporary file
means the rename, and what it guarded, never happened.

The directories holding them must be ours alone (check_private_dir): a
record is trusted as something we wrote."""

from __future__ import annotations

import os
import stat

from migrated.errors import MigratedError


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


class UnsafeStateDir(MigratedError):
    """The state dir (or a directory of records in it) could be written by
    someone other than us: its records cannot be trusted."""


def check_private_dir(path: str, what: str = "state dir") -> None:
    """Refuse ``path`` unless only we (and root) can change what it holds,
    like sshd's StrictModes: it must be a directory owned by our effective
    uid and not writable by group or others, and every directory above it
    (after resolving symlinks) must be owned by root or us and not writable
    by group or others unless sticky (/tmp: others cannot rename or remove
    our entries there).  Otherwise anyone who can write there could plant
    records -- a frozen-PID record makes ``--thaw-journal`` (run as root)
    send SIGCONT to a process of the planter's choosing.  Raises
    UnsafeStateDir saying what is wrong and how to fix it."""
    euid = os.geteuid()
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as e:
        raise UnsafeStateDir(f"cannot check the {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeStateDir(f"the {what} {path} is not a directory")
    fix = f"chown {euid} {real} && chmod go-w {real}"
    if st.st_uid != euid:
        raise UnsafeStateDir(f"the {what} {path} is owned by uid {st.st_uid}, not by uid {euid} "
                             f"that runs migrated, so its records cannot be trusted; refusing "
                             f"to use it: check who put them there, then `{fix}` "
                             "or choose another --state-dir")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeStateDir(f"the {what} {path} is writable by group or others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}), so its records cannot be trusted; "
                             f"refusing to use it: check its contents, then `chmod go-w {real}`")
    parent = os.path.dirname(real)
    while True:
        try:
            pst = os.stat(parent)
        except OSError as e:
            raise UnsafeStateDir(f"cannot check {parent} above the {what} {path}: "
                                 f"{e.strerror or e}") from None
        if pst.st_uid not in (0, euid) or (pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
                                           and not pst.st_mode & stat.S_ISVTX):
            raise UnsafeStateDir(f"{parent} above the {what} {path} can be changed by others "
                                 f"(uid {pst.st_uid}, mode {stat.S_IMODE(pst.st_mode):04o}), who "
                                 "could swap the state dir; refusing to use it: choose a "
                                 "--state-dir under directories only root can change")
        if parent == "/":
            return
        parent = os.path.dirname(parent)


def private_subdir(state_dir: str, name: str, what: str) -> str:
    """``state_dir/name`` created 0700 if missing, both checked with
    check_private_dir; returns its path."""
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise UnsafeStateDir(f"cannot create the state dir {state_dir}: "
                             f"{e.strerror or e}") from None
    check_private_dir(state_dir)
    sub = os.path.join(state_dir, name)
    try:
        os.mkdir(sub, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise UnsafeStateDir(f"cannot create the {what} {sub}: {e.strerror or e}") from None
    check_private_dir(sub, what)
    return sub


def read_own_record(path: str, limit: int) -> bytes:
    """Up to ``limit`` bytes of the record ``path``, which must be a regular
    file owned by our effective uid; a symlink is never followed.  Raises
    FileNotFoundError if it is gone, ValueError if it is not ours."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise ValueError(f"not a regular file owned by uid {os.geteuid()} "
                             f"(owner uid {st.st_uid}); not trusted")
        return os.read(fd, limit)
    finally:
        os.close(fd)
