"""The destination's round figures and the timings it seals into the image
(review 16; issue 4 item 6, issue 3 "timings" in the manifest).

- every round has a line at both ends: the destination counts the data
  and zero pages it received per round itself (the figure the source logs
  as ``pages``), and logs the frozen round too (``final``: true), from its
  own counts -- with --max-rounds 0 that is the only round;
- a real source and destination log the same ``pages`` for every round;
- the committed image's manifest carries meta["timings"]: the kept rounds
  and the freeze as seen by the destination, a few KiB at most.
"""

from __future__ import annotations

import json
import socket

from migrated.engine import dest as D
from migrated.engine.dest import DestMigration
from migrated.engine.source import SendOptions
from migrated.engine.transport import BlockingTransport
from migrated.runs import PAGE_SIZE, PageRuns
from migrated.wire import (CommitRequest, Committed, FinalEnd, Freeze, Release, Released,
                           RoundEnd, Zeros)
from migrated.wire import limits as L
from migrated.wire.frames import encode
from tests.engine.harness import migrate
from tests.engine.procs import workload
from tests.engine.test_dest_bounds import DestRun, store  # noqa: F401 -- fixture
from tests.hostile.peer import BASE, anon_layout, pages


def _zeros(rnd: int, first: int, n: int) -> Zeros:
    return Zeros(rnd, PageRuns.from_pairs([(BASE + first * PAGE_SIZE, n)]))


def _commit(p, run: DestRun, held: int) -> str:
    p.send(CommitRequest(held))
    committed = p.expect(Committed, timeout=30)
    p.send_raw(encode(Release(committed.image_id)))  # (our state machine saw no Committed)
    p.expect(Released, timeout=30)
    p.half_close()
    assert run.wait(30)["status"] == "completed"
    return committed.image_id


def _round_events(run: DestRun) -> list[dict]:
    return [e for e in run.events if e["event"] == "round"]


def test_each_round_counts_data_and_zero_pages_and_the_frozen_round_has_its_line(store):
    run = DestRun(store)
    p = run.peer()
    p.handshake(mid="figures-rounds")
    p.send(anon_layout(0, 64))
    p.send(pages(0, BASE, 4))
    p.send(_zeros(0, 10, 3))
    p.send(RoundEnd(0, 4, 12345, 10.0, 1.0, 2.0, 0.5))
    p.send(Freeze(1))
    p.send(pages(1, BASE + 20 * PAGE_SIZE, 2))
    p.send(_zeros(1, 30, 1))
    p.send(FinalEnd(1, 6))
    image_id = _commit(p, run, 4 + 3 + 2 + 1)

    r0, r1 = _round_events(run)
    assert (r0["round"], r0["pages"], r0["data_pages"], r0["zero_pages"], r0["final"]) == \
        (0, 7, 4, 3, False)
    assert r0["bytes"] == 12345 and r0["duration_ms"] == 10.0    # the source's figures
    assert (r1["round"], r1["pages"], r1["data_pages"], r1["zero_pages"], r1["final"]) == \
        (1, 3, 2, 1, True)
    assert r1["bytes"] >= 2 * PAGE_SIZE and r1["duration_ms"] >= 0
    assert r1["dirty_rate"] is None and r1["pause_ms"] is None   # never crossed the wire
    assert [r["pages"] for r in run.result["rounds"]] == [7, 3]

    timings = store.show(image_id)["meta"]["timings"]
    assert [(r["round"], r["pages"], r.get("final")) for r in timings["rounds"]] == \
        [(0, 7, False), (1, 3, True)]
    assert "dirty_rate" not in timings["rounds"][1]             # unknown: left out
    assert timings["rounds_total"] == 2 and timings["rounds_left_out"] == 0
    assert timings["receive_ms"] >= timings["frozen_receive_ms"] >= 0
    assert timings["bytes_received"] > 6 * PAGE_SIZE


def test_stop_and_copy_logs_its_one_round(store):
    """--max-rounds 0: Freeze comes first; the destination used to log
    freeze and commit only, no round at all."""
    run = DestRun(store)
    p = run.peer()
    p.handshake(mid="figures-sac")
    p.send(Freeze(0))
    p.send(anon_layout(0, 64))
    p.send(pages(0, BASE, 5))
    p.send(_zeros(0, 40, 2))
    p.send(FinalEnd(0, 5))
    _commit(p, run, 7)
    (r,) = _round_events(run)
    assert (r["round"], r["pages"], r["final"]) == (0, 7, True)


def test_source_and_destination_log_the_same_pages_for_every_round(store):
    with workload(mib=8, rate=2000, zero_mib=2) as w:
        out = migrate(w.pid, store, SendOptions(then="resume", max_rounds=3))
    assert out.source["status"] == "completed", out.source.get("error")
    assert out.dest["status"] == "completed", out.dest.get("error")
    src = [(e["round"], e["pages"], e["final"]) for e in out.rounds()]
    dst = [(e["round"], e["pages"], e["final"]) for e in out.dest_events
           if e["event"] == "round"]
    assert src == dst
    assert src[-1][2] is True and any(e["zero_pages"] for e in out.rounds())
    live = [e for e in out.dest_events if e["event"] == "round" and not e["final"]]
    assert [e["bytes"] for e in live] == [e["bytes"] for e in out.rounds() if not e["final"]]
    meta = store.show(out.dest["image_id"])["meta"]
    assert [(r["round"], r["pages"], r["final"]) for r in meta["timings"]["rounds"]] == dst
    # Every round's line carries every figure (issue 4), the frozen one too:
    # its dirty rate and pause come in final-end ("final-figures").
    keys = ("round", "pages", "bytes", "duration_ms", "dirty_rate", "bandwidth", "pause_ms")
    for e in (e for e in out.dest_events if e["event"] == "round"):
        assert all(isinstance(e.get(k), (int, float)) for k in keys), e
    final_src = out.rounds()[-1]
    final_dst = [e for e in out.dest_events if e["event"] == "round"][-1]
    assert (final_dst["dirty_rate"], final_dst["pause_ms"]) == \
        (round(final_src["dirty_rate"], 1), round(final_src["pause_ms"], 3))


def test_the_timings_stay_a_few_kib_whatever_the_round_count():
    a, b = socket.socketpair()
    try:
        dm = DestMigration(BlockingTransport(b, timeout=1.0), store=None, node="t")
        big = float(L.MAX_FIGURE)
        for r in range(1000):
            dm.rounds.add({"round": L.MAX_ROUND - 1000 + r, "pages": 2 ** 52, "bytes": L.U63_MAX,
                           "duration_ms": big, "dirty_rate": big, "bandwidth": big,
                           "pause_ms": big, "data_pages": 2 ** 52, "zero_pages": 2 ** 52,
                           "final": r == 999})
        t = dm._timings()
    finally:
        a.close()
        b.close()
    assert len(t["rounds"]) == D.TIMINGS_ROUNDS_FIRST + D.TIMINGS_ROUNDS_LAST
    assert t["rounds_total"] == 1000
    assert t["rounds_left_out"] == 1000 - len(t["rounds"])
    assert t["rounds"][-1]["final"] is True
    assert len(json.dumps(t)) <= D.MAX_TIMINGS_BYTES
