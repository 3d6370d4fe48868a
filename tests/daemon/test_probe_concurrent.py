"""`probe` requests at once: each forks a child (process_vm_readv is tried
on another mm); the children must not hold each other up."""

from __future__ import annotations

import os
import signal
import threading

from .conftest import control_request

# Probes asked at once, and rounds of them: one round of eight left four to
# six of them waiting for ever in most runs before the fix.
CONCURRENT_PROBES = 8
ROUNDS = 3
# A probe answers in tens of milliseconds; this only bounds a hung one.
PROBE_ANSWER_S = 10.0


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except FileNotFoundError:
            continue
    return out


def test_concurrent_probes_all_answer_and_leave_no_child(daemons):
    """Two probes forking at once each gave its child a copy of the other's
    pipe: neither child saw EOF, both requests hung (their executor threads
    in waitpid for ever), and the children -- copies of the daemon -- kept
    its state-dir lock after it died, so `migrated --thaw-journal` refused
    to thaw what it had frozen."""
    d = daemons("a")
    failures: list[str] = []
    leftover: list[int] = []

    def ask():
        try:
            res = control_request(d.control, {"op": "probe"}, timeout=PROBE_ANSWER_S)
            if "result" not in res or "kernel" not in res["result"]:
                failures.append(f"bad answer {res!r}")
        except OSError as e:
            failures.append(f"no answer within {PROBE_ANSWER_S:g} s ({e})")

    try:
        for _ in range(ROUNDS):
            threads = [threading.Thread(target=ask) for _ in range(CONCURRENT_PROBES)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            leftover = _children(d.proc.pid)
            if failures or leftover:
                break
        assert not failures, failures
        assert not leftover, f"probe children of the daemon still running: {leftover}"
    finally:
        # Children a hung probe left (copies of the daemon we started):
        # only those, by PID, before the daemon itself is stopped.
        for pid in leftover or _children(d.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
