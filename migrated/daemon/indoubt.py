"""Migrations left in doubt, kept on disk until they are resolved.

Before a sending migration sends Release (SPEC.md 9.1) it writes
``<state-dir>/indoubt/<migration id>.json`` -- pid, start time, peer,
image id -- durably, like the frozen-PID journal.  Then:

- Released arrives and the migration completes: the record is removed.
- The migration fails after that point (no Released: timeout, broken link,
  cancel): the process was thawed and runs here again, so the image the
  destination may have published must go.  A resolver thread asks the
  destination to withdraw it (engine/withdraw.py), retrying with backoff
  while the peer is unreachable, and removes the record once answered.
  Before the first attempt the record is rewritten, durably, with the
  verdict "failed": the source has decided, once.
- The daemon dies in between: at the next start each record is looked at
  after the frozen-PID journal has thawed what we froze.  A record with
  the verdict "failed" is withdrawn whatever the process does meanwhile
  (it ran on after the image was taken: exited or stopped since, it is
  still not the image's process).  A record without one was left inside
  the Release/Released window: if the process is still ours (same start
  time) and running, the source has it, so the image is withdrawn; if it
  is gone (killed by ``--then kill``) or stopped (``--then stop`` had been
  applied), the migration had completed: the image is the copy to keep,
  and the record is dropped.  A record written before the machine last
  booted (its boot id differs) is such a record too: the reboot ended the
  process, so the destination's image is the only copy left -- and a new
  process that happens to have the old PID and start time (counted from
  boot, so early-boot services repeat them) is not ours.

So the only lasting double copy left is a destination that stays
unreachable until the resolver gives up -- after ``GIVE_UP_S`` of trying
in this run of the daemon and at least ``GIVE_UP_MIN_ATTEMPTS`` attempts,
timed on the monotonic clock (a daemon down for a day, or a clock that
stepped, gave up after one attempt) -- which is logged as an error naming
the image.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

from migrated.daemon.durable import fsync_dir, private_subdir, read_own_record, write_record
from migrated.daemon.journal import boot_id
from migrated.errors import MigratedError, NoSuchProcess
from migrated.kernel import procfs
from migrated.threads import Thread

SUBDIR = "indoubt"
MAX_RECORD_BYTES = 4096
# Backoff between attempts while the destination cannot be reached.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
# After this long trying in this run of the daemon, and at least this many
# attempts, stop trying (and say so loudly).
GIVE_UP_S = 24 * 3600.0
GIVE_UP_MIN_ATTEMPTS = 10
# The verdict a record carries once the migration failed after Release.
VERDICT_FAILED = "failed"
# Each attempt's waits (connect, handshake, answer).
ATTEMPT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Pending:
    mid: str
    pid: int
    starttime: int
    host: str
    port: int
    image_id: str
    since: float            # wall clock when written (for people; never timed)
    verdict: str = ""       # VERDICT_FAILED once the source decided it failed
    boot_id: str = ""       # the boot the record was written in ("" = unknown)


class InDoubt:
    """The records, and the threads that resolve them.  ``attempt(rec)``
    makes one withdrawal attempt and returns the outcome ("removed" or
    "absent"); it raises WithdrawRefused when retrying is pointless and
    any other exception when it should be retried."""

    def __init__(self, state_dir: str, log, attempt: Callable[[Pending], str]):
        # A record makes us withdraw an image on a peer: only records we
        # wrote count, so the directory must be ours alone (UnsafeStateDir).
        self.dir = private_subdir(state_dir, SUBDIR, "in-doubt record dir")
        self.log = log
        self.attempt = attempt
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._stop = threading.Event()

    def _path(self, mid: str) -> str:
        return os.path.join(self.dir, f"{mid}.json")

    # -- the engine's side ----------------------------------------------------

    def record(self, rec: Pending) -> None:
        """Durably note that Release is about to be sent, in this boot
        (unless ``rec`` names one).  Raises: the engine must not send
        Release without this record."""
        self._write(rec if rec.boot_id else replace(rec, boot_id=boot_id()))

    def _write(self, rec: Pending) -> None:
        final = self._path(rec.mid)
        try:
            write_record(final, json.dumps(asdict(rec)).encode(), f"{final}.tmp")
        except OSError as e:
            raise MigratedError(f"cannot record migration {rec.mid} in {self.dir}: "
                                f"{e.strerror}; not releasing the image (check the state "
                                "dir is writable)") from e

    def settle(self, mid: str) -> None:
        """Released arrived: nothing is in doubt."""
        if _unlink(self._path(mid)):
            try:
                fsync_dir(self.dir)
            except OSError:
                pass

    def has(self, mid: str) -> bool:
        return os.path.exists(self._path(mid))

    def resolve(self, mid: str) -> bool:
        """The migration failed after its record was written: withdraw the
        image in the background.  False when there is no record."""
        rec = self._load(self._path(mid))
        if rec is None:
            return False
        if rec.verdict != VERDICT_FAILED:
            rec = replace(rec, verdict=VERDICT_FAILED)
            try:
                self._write(rec)
            except MigratedError as e:
                # The withdrawal still goes ahead; only a restart before it
                # ends could misjudge the record (as before the verdict).
                self.log.error("indoubt_verdict_unsaved", mid, error=str(e))
        self._start(rec)
        return True

    # -- daemon start ---------------------------------------------------------

    def resume(self) -> dict:
        """Look at every record left by an earlier run (after the frozen-PID
        journal was replayed) and resolve or drop it."""
        out = {"withdrawing": [], "completed": []}
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if name.endswith(".tmp"):
                _unlink(path)          # Release was never sent after it
                continue
            rec = self._load(path)
            if rec is None:
                continue
            if rec.verdict == VERDICT_FAILED or _still_running_here(rec):
                out["withdrawing"].append(rec.mid)
                self._start(rec)
            else:
                out["completed"].append(rec.mid)
                self.log.info("indoubt_settled", rec.mid, pid=rec.pid, image_id=rec.image_id,
                              reason="the process is gone or stopped here (or the machine "
                                     "rebooted since): the migration completed; the "
                                     "destination's image is the copy")
                self.settle(rec.mid)
        return out

    def close(self) -> None:
        self._stop.set()

    def pending(self) -> list[str]:
        with self._lock:
            return [mid for mid, t in self._threads.items() if t.is_alive()]

    # -- resolving ------------------------------------------------------------

    def _start(self, rec: Pending) -> None:
        with self._lock:
            # Finished resolvers go (the daemon runs for months).
            for mid in [k for k, x in self._threads.items() if not x.is_alive()]:
                del self._threads[mid]
            t = self._threads.get(rec.mid)
            if t is not None and t.is_alive():
                return
            t = Thread(target=self._resolve, args=(rec,), daemon=True,
                       name=f"withdraw-{rec.mid}")
            self._threads[rec.mid] = t
        t.start()

    def _resolve(self, rec: Pending) -> None:
        from migrated.engine.withdraw import WithdrawRefused
        delay = RETRY_FIRST_S
        began, attempts = time.monotonic(), 0
        peer = f"{rec.host}:{rec.port}"
        self.log.warning("withdraw_start", rec.mid, peer=peer, image_id=rec.image_id,
                         reason="Release was sent but the migration failed; asking the "
                                "destination to withdraw the image")
        while not self._stop.is_set():
            attempts += 1
            try:
                outcome = self.attempt(rec)
            except WithdrawRefused as e:
                self.log.error("withdraw_refused", rec.mid, peer=peer, image_id=rec.image_id,
                               error=str(e), hint="check `migratectl images list` on the "
                               "destination and remove the image by hand if it is there")
                self.settle(rec.mid)
                return
            except Exception as e:  # noqa: BLE001 -- unreachable peer: retry
                if time.monotonic() - began > GIVE_UP_S and attempts >= GIVE_UP_MIN_ATTEMPTS:
                    self.log.error("withdraw_gave_up", rec.mid, peer=peer,
                                   image_id=rec.image_id, error=str(e),
                                   hint="the destination may hold a second copy: remove "
                                        "it there with `migratectl images rm`")
                    self.settle(rec.mid)
                    return
                self.log.warning("withdraw_retry", rec.mid, peer=peer, error=str(e),
                                 retry_in_s=round(delay, 1))
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self.log.info("withdraw_done", rec.mid, peer=peer, image_id=rec.image_id,
                          outcome=outcome)
            self.settle(rec.mid)
            return

    def _load(self, path: str) -> Pending | None:
        try:
            raw = read_own_record(path, MAX_RECORD_BYTES + 1)
            d = json.loads(raw)
            rec = Pending(mid=str(d["mid"]), pid=int(d["pid"]),
                          starttime=int(d["starttime"]), host=str(d["host"]),
                          port=int(d["port"]), image_id=str(d["image_id"]),
                          since=float(d["since"]), verdict=str(d.get("verdict", "")),
                          boot_id=str(d.get("boot_id", "")))
            if len(raw) > MAX_RECORD_BYTES or os.path.basename(path) != f"{rec.mid}.json":
                raise ValueError("not an in-doubt record")
        except FileNotFoundError:
            return None
        # OverflowError: a number no float holds (since: 1e400 written as an
        # integer); RecursionError: JSON nested deeper than the parser goes.
        # Either would have ended the daemon's start (resume) at this record.
        except (OSError, ValueError, KeyError, TypeError, OverflowError,
                RecursionError) as e:
            self.log.error("indoubt_bad_record", file=path, error=str(e))
            return None
        return rec


def _still_running_here(rec: Pending) -> bool:
    """The process of ``rec`` exists (same boot, same start time) and is not
    stopped."""
    now = boot_id()
    if rec.boot_id and now and rec.boot_id != now:
        return False
    try:
        st = procfs.read_stat(rec.pid)
    except (NoSuchProcess, MigratedError, OSError):
        return False
    return st.starttime == rec.starttime and st.state not in ("T", "t", "Z", "X")


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
