"""The frozen-PID journal: a process we froze is thawed even if we die.

Format: one small JSON file per frozen PID, ``<state-dir>/frozen/<pid>.json``
holding ``{"pid", "starttime", "boot_id", "mid", "frozen_at"}``.  A record
is written to a temporary name, fsynced, renamed into place and the
directory fsynced -- all *before* the engine sends SIGSTOP -- so after a
crash at any instant the record either is complete or does not exist, and
a process we stopped always has one.  Thawing removes it (after SIGCONT).

Replay (daemon start, ``migrated --thaw-journal`` from ExecStopPost): for
each record, open a pidfd first, then read /proc/PID/stat; only if the
start time (and boot) match the record is it the process we froze -- a
recycled PID has another start time and is left alone.  That process gets
SIGCONT through the pidfd (so the signal can never reach a process that
took the PID over in between) whatever state it shows: T when our stop
took hold; t when a tracer attached since; D or S with our SIGSTOP still
pending when the daemon died before the stop completed (a thread in
uninterruptible sleep stops only when it leaves the kernel) -- SIGCONT
discards a pending SIGSTOP, while skipping it would let the stop take hold
later with no record left to undo it.  The record is then removed.  One
unreadable or malformed record is logged and kept; it never stops the
replay of the others.

A record is trusted only as something we wrote, so the state dir and
``frozen/`` must be ours alone: owned by our effective uid, not writable by
group or others, under directories only root or we can change
(durable.check_private_dir).  Otherwise the journal refuses to open
(UnsafeStateDir) and nothing in it is acted on -- a record planted by
another user would make a root ``--thaw-journal`` SIGCONT any process.
Each record must also be a regular file we own (not a symlink).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from dataclasses import dataclass

from migrated.daemon.durable import fsync_dir, private_subdir, read_own_record, write_record
from migrated.errors import MigratedError, NoSuchProcess
from migrated.kernel import procfs

JOURNAL_SUBDIR = "frozen"
# A record is a few hundred bytes; anything bigger is not ours.
MAX_RECORD_BYTES = 4096
# PIDs are at most PID_MAX_LIMIT (2**22 on 64-bit kernels).
MAX_PID = 1 << 22


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Record:
    pid: int
    starttime: int
    boot_id: str = ""
    mid: str = ""
    frozen_at: float = 0.0


@dataclass
class ReplayResult:
    thawed: list[int]
    not_stopped: list[int]      # ours, already running again (SIGCONT sent anyway)
    gone: list[int]             # exited, or PID recycled, or another boot
    failed: list[int]           # kept for the next replay

    def as_dict(self) -> dict:
        return {"thawed": self.thawed, "not_stopped": self.not_stopped,
                "gone": self.gone, "failed": self.failed}


class FrozenJournal:
    def __init__(self, state_dir: str, log=None):
        # Raises UnsafeStateDir (module doc) before any record is read.
        self.dir = private_subdir(state_dir, JOURNAL_SUBDIR, "frozen-PID journal")
        self.log = log
        self._boot = boot_id()
        self._lock = threading.Lock()

    def _path(self, pid: int) -> str:
        return os.path.join(self.dir, f"{int(pid)}.json")

    # -- engine hooks (called from worker threads) --------------------------

    def on_freeze(self, pid: int, starttime: int, mid: str = "") -> None:
        """Durably record that we are about to stop ``pid``.  Raises on
        failure: the engine must not freeze a process it could not journal."""
        rec = {"pid": int(pid), "starttime": int(starttime), "boot_id": self._boot,
               "mid": mid, "frozen_at": time.time()}
        data = json.dumps(rec).encode()
        final = self._path(pid)
        tmp = f"{final}.tmp.{threading.get_ident()}"
        with self._lock:
            try:
                write_record(final, data, tmp)
            except OSError as e:
                raise MigratedError(
                    f"cannot journal frozen process {pid} in {self.dir}: {e.strerror}; "
                    "refusing to freeze it (check the state dir is writable)") from e

    def on_thaw(self, pid: int) -> None:
        with self._lock:
            try:
                os.unlink(self._path(pid))
            except FileNotFoundError:
                return
            fsync_dir(self.dir)

    # -- reading and replay -------------------------------------------------

    def records(self) -> list[Record]:
        out = []
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if ".tmp." in name:
                # A write that never reached its rename: the freeze it was
                # guarding never happened (SIGSTOP follows the rename).
                _unlink_quiet(path)
                continue
            if not name.endswith(".json"):
                continue
            try:
                raw = read_own_record(path, MAX_RECORD_BYTES + 1)
                d = json.loads(raw)
                rec = Record(pid=int(d["pid"]), starttime=int(d["starttime"]),
                             boot_id=str(d.get("boot_id", "")), mid=str(d.get("mid", "")),
                             frozen_at=float(d.get("frozen_at", 0.0)))
                if len(raw) > MAX_RECORD_BYTES or name != f"{rec.pid}.json":
                    raise ValueError("not a journal record")
                if not 0 < rec.pid <= MAX_PID or rec.starttime < 0:
                    raise ValueError(f"pid {rec.pid} or start time {rec.starttime} out of range")
            # RecursionError: JSON nested deeper than the parser goes (a
            # few KiB of '[' suffice); like any bad record it must not stop
            # the replay of the others (the processes they name stay stopped).
            except (OSError, ValueError, KeyError, TypeError, OverflowError,
                    RecursionError) as e:
                self._log("error", "journal_bad_record", file=path, error=str(e))
                continue
            out.append(rec)
        return out

    def replay(self) -> ReplayResult:
        res = ReplayResult([], [], [], [])
        for rec in self.records():
            try:
                outcome = self._replay_one(rec)
            except Exception as e:  # noqa: BLE001 -- one record never stops the rest
                self._log("error", "journal_thaw_failed", rec.mid or None, pid=rec.pid,
                          error=f"{type(e).__name__}: {e}")
                outcome = "failed"
            getattr(res, outcome).append(rec.pid)
            if outcome != "failed":
                self.on_thaw(rec.pid)
        return res

    def _replay_one(self, rec: Record) -> str:
        mid = rec.mid or None
        if rec.boot_id and self._boot and rec.boot_id != self._boot:
            self._log("info", "journal_stale", mid, pid=rec.pid, reason="record from an earlier boot")
            return "gone"
        try:
            pidfd = os.pidfd_open(rec.pid)
        except ProcessLookupError:
            self._log("info", "journal_gone", mid, pid=rec.pid, reason="process exited")
            return "gone"
        except OSError as e:
            self._log("error", "journal_thaw_failed", mid, pid=rec.pid, error=e.strerror)
            return "failed"
        try:
            try:
                st = procfs.read_stat(rec.pid)
            except NoSuchProcess:
                self._log("info", "journal_gone", mid, pid=rec.pid, reason="process exited")
                return "gone"
            if st.starttime != rec.starttime:
                self._log("warning", "journal_recycled", mid, pid=rec.pid,
                          reason="PID now belongs to another process (start time differs); left alone",
                          journal_starttime=rec.starttime, starttime=st.starttime)
                return "gone"
            try:
                stopping = st.state in "Tt" or procfs.sigstop_pending(rec.pid)
            except NoSuchProcess:
                stopping = False    # exiting: the signal below says "gone"
            # SIGCONT whatever the state (module doc): harmless to a process
            # that runs, and it cancels a SIGSTOP still pending.
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGCONT)
            except ProcessLookupError:
                return "gone"
            except OSError as e:
                self._log("error", "journal_thaw_failed", mid, pid=rec.pid, error=e.strerror)
                return "failed"
            if not stopping:
                self._log("info", "journal_not_stopped", mid, pid=rec.pid, state=st.state)
                return "not_stopped"
            self._log("warning", "journal_thawed", mid, pid=rec.pid, state=st.state,
                      frozen_s=round(time.time() - rec.frozen_at, 3) if rec.frozen_at else None)
            return "thawed"
        finally:
            os.close(pidfd)

    def _log(self, level: str, event: str, mid: str | None = None, **fields) -> None:
        if self.log is not None:
            self.log.line(event, mid, level, **fields)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
