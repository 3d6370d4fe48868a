"""The destination's progress rule and its handling of a source's error
codes (review 16): a real DestMigration over 127.0.0.1, the source played
by hand (tests.hostile.peer.RawPeer).

- a source that sends only keepalives while streaming (or frozen) is cut
  with error(timeout) once the progress bound passes, and run() returns
  (the daemon's --max-migrations slot is freed with it); real messages
  restart the bound, so a slow but working source is never cut;
- an error code the destination does not know counts as "internal" in its
  summary and log, the source's own code kept in the message.
"""

from __future__ import annotations

import time

import pytest

from migrated.engine import dest as D
from migrated.engine.dest import DestLimits
from migrated.wire import Error, Freeze, Zeros
from migrated.runs import PAGE_SIZE, PageRuns
from migrated.wire.frames import encode
from tests.engine.test_dest_bounds import IO_S, DestRun, _wait_error, store  # noqa: F401 -- fixture
from tests.hostile.peer import BASE, anon_layout, frame, raw_msg

IDLE_S = 1.0          # the destination's idle timeout here
PROGRESS_S = 2.0      # its progress bound here (10 x idle, 300 s at least, by default)


def _limits() -> DestLimits:
    return DestLimits(idle_timeout_s=IDLE_S, handshake_timeout_s=5.0,
                      progress_timeout_s=PROGRESS_S)


def _keepalives_until_error(p, seconds: float):
    """Keepalives every 0.2 s for at most ``seconds``: the destination's
    Error (or None) and when it came."""
    return _wait_error(p, seconds, keepalives=True, every=0.2)


def test_the_default_bound_is_far_above_what_a_real_source_spends_on_keepalives():
    lim = DestLimits(idle_timeout_s=30.0)
    assert lim.progress_s() == D.PROGRESS_IDLE_FACTOR * 30.0 >= D.MIN_PROGRESS_TIMEOUT_S
    # a short --peer-timeout does not shorten it below the floor
    assert DestLimits(idle_timeout_s=2.0).progress_s() == D.MIN_PROGRESS_TIMEOUT_S


@pytest.mark.parametrize("frozen", [False, True], ids=["streaming", "frozen"])
def test_keepalives_alone_do_not_hold_a_session_for_ever(store, frozen):
    run = DestRun(store, limits=_limits())
    p = run.peer()
    p.handshake(mid="progress-ka")
    p.send(anon_layout(0, 64))
    if frozen:
        p.send(Freeze(0))
    err, took = _keepalives_until_error(p, PROGRESS_S + IDLE_S + IO_S + 6)
    assert err is not None, f"still held after {took:.1f} s of keepalives"
    assert err.code == "timeout", err
    assert "only keepalives" in err.message and "slot" in err.message, err.message
    assert PROGRESS_S - 0.5 <= took < PROGRESS_S + IDLE_S + 2, took
    s = run.wait()
    assert s["status"] == "failed" and s["error_code"] == "timeout"
    assert "only keepalives" in s["error"]
    assert not run.thread.is_alive()        # the session (and its slot) is gone


def test_real_messages_restart_the_progress_bound(store):
    """Keepalives with a real message now and then, for longer than the
    bound in all: a working source is never cut."""
    run = DestRun(store, limits=_limits())
    p = run.peer()
    p.handshake(mid="progress-ok")
    p.send(anon_layout(0, 64))
    t0 = time.monotonic()
    k = 0
    while time.monotonic() - t0 < 2.5 * PROGRESS_S:
        err, _ = _keepalives_until_error(p, PROGRESS_S * 0.6)
        assert err is None, f"cut after {time.monotonic() - t0:.1f} s: {err}"
        p.send(Zeros(0, PageRuns.from_pairs([(BASE + (k % 64) * PAGE_SIZE, 1)])))
        k += 1
    assert run.thread.is_alive()
    p.send_raw(encode(Error("internal", "test over")))
    s = run.wait()
    assert s["error_code"] == "internal"


@pytest.mark.parametrize("code,expected", [("made-up-code", "internal"),
                                           ("disk-full", "disk-full")])
def test_an_error_code_we_do_not_know_counts_as_internal(store, code, expected):
    run = DestRun(store)
    p = run.peer()
    p.handshake(mid="progress-code")
    p.send(anon_layout(0, 64))
    p.send_raw(frame(raw_msg({"type": "error", "code": code, "message": "bye"})))
    s = run.wait()
    assert s["status"] == "failed" and s["error_code"] == expected
    assert f"({code})" in s["error"] and "bye" in s["error"]     # the source's own words
    end = [e for e in run.events if e["event"] == "end"][0]
    assert end["error_code"] == expected
