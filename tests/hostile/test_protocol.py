"""Hostile peers against a running daemon (issue 5 item 4): raw protocol.

A plaintext (--insecure) destination daemon is attacked with garbage,
truncated frames, lengths at every integer limit, messages out of state,
page runs outside the declared mappings, absurd layouts, digests that do
not match, counts that do not add up, more data than the quota, and peers
that go silent.  After each attack:

- the daemon sent an Error with the expected code and closed the
  connection within a bounded time (bounded in total for a peer that keeps
  talking without getting anywhere);
- the attack cost the daemon no more than ``ATTACK_RSS_GROWTH_KIB`` of
  resident memory, and over the whole module it stays under
  ``RSS_LIMIT_KIB`` (tests/hostile/bounds.py);
- no complete image of a hostile migration exists and the daemon lives;

while a legitimate source daemon migrates a real process to the same
daemon, back to back, the whole time: every one of those migrations must
complete (the last test).
"""

from __future__ import annotations

import time

import msgpack
import pytest

from migrated.runs import PAGE_SIZE
from migrated.wire import (CommitRequest, Committed, FinalEnd, Freeze, Keepalive, Layout,
                           MappingInfo, RoundEnd, Withdraw, Withdrawn)
from migrated.wire import limits as L
from tests.cluster import wait_until

from .bounds import ATTACK_RSS_GROWTH_KIB, CLOSE_WITHIN_S, RSS_LIMIT_KIB
from .peer import (BASE, RawPeer, anon_layout, frame, hello, pages, raw_msg, runs_bin,
                   start)

U32_MAX = (1 << 32) - 1
MAX_IDLE_FRAME = L.MAX_CONTROL_FRAME      # what a Hello-awaiting daemon admits


def _streaming(p: RawPeer) -> None:
    p.handshake()
    p.send(anon_layout(0, 64))


# name -> (attack, acceptable Error codes)
ATTACKS: dict[str, tuple] = {}


def attack(name: str, codes: set[str]):
    def deco(fn):
        ATTACKS[name] = (fn, codes)
        return fn
    return deco


# -- before the handshake: bytes that are not our protocol --------------------------

@attack("garbage", {"malformed"})
def _(p):
    p.send_raw(bytes(range(256)) * 4)


@attack("http-request", {"malformed"})
def _(p):
    p.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


@attack("tls-client-hello", {"malformed"})
def _(p):
    p.send_raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32))


@attack("framing-version-2", {"version"})
def _(p):
    p.send_raw(L.PREAMBLE_MAGIC + b"\x02")


@attack("truncated-preamble-then-eof", {"malformed"})
def _(p):
    p.send_raw(L.PREAMBLE[:4])
    p.half_close()


@attack("silent-after-connect", {"timeout"})
def _(p):
    pass


@attack("silent-after-preamble", {"timeout"})
def _(p):
    p.preamble()


# -- lengths at every integer limit ----------------------------------------------------

@attack("length-0", {"malformed"})
def _(p):
    p.send_raw(L.PREAMBLE + frame(b"", 0))


@attack("length-max-idle-frame-garbage-body", {"malformed"})
def _(p):
    p.send_raw(L.PREAMBLE + frame(b"\xc1" * MAX_IDLE_FRAME))


@attack("length-max-idle-frame-plus-1", {"too-large"})
def _(p):
    p.send_raw(L.PREAMBLE + LENGTH(MAX_IDLE_FRAME + 1))


@attack("length-max-frame-before-handshake", {"too-large"})
def _(p):
    p.send_raw(L.PREAMBLE + LENGTH(L.MAX_FRAME))


@attack("length-u32-max", {"too-large"})
def _(p):
    p.send_raw(L.PREAMBLE + LENGTH(U32_MAX))


@attack("streaming-length-max-frame-plus-1", {"too-large"})
def _(p):
    _streaming(p)
    p.send_raw(LENGTH(L.MAX_FRAME + 1))


@attack("streaming-length-u32-max", {"too-large"})
def _(p):
    _streaming(p)
    p.send_raw(LENGTH(U32_MAX))


@attack("streaming-length-max-frame-then-silence", {"timeout"})
def _(p):
    # Declares the largest legal frame, sends its type and goes quiet: the
    # daemon must neither wait forever nor reserve the 9 MiB up front.
    _streaming(p)
    p.send_raw(LENGTH(L.MAX_FRAME) + b"\x8a" + msgpack.packb("type") + msgpack.packb("layout"))


@attack("truncated-frame-then-eof", {"malformed"})
def _(p):
    body = raw_msg(hello().to_wire())
    p.send_raw(L.PREAMBLE + frame(body)[:len(body) // 2])
    p.half_close()


@attack("truncated-frame-then-silence", {"timeout"})
def _(p):
    body = raw_msg(hello().to_wire())
    p.send_raw(L.PREAMBLE + frame(body)[:len(body) // 2])


# -- out of state -------------------------------------------------------------------

@attack("pages-before-hello", {"out-of-state"})
def _(p):
    p.send_raw(L.PREAMBLE + frame(raw_msg(pages(0, BASE, 1).to_wire())))


@attack("start-before-hello", {"out-of-state"})
def _(p):
    p.send_raw(L.PREAMBLE + frame(raw_msg(start().to_wire())))


@attack("committed-to-destination", {"out-of-state"})
def _(p):
    p.send_raw(L.PREAMBLE + frame(raw_msg(Committed("20250101-000000.000-0123456789",
                                                    "xxh3-128:00").to_wire())))


@attack("hello-twice", {"out-of-state"})
def _(p):
    p.send(hello())
    p.send_raw(frame(raw_msg(hello().to_wire())))


@attack("pages-before-layout", {"out-of-state"})
def _(p):
    p.handshake()
    p.send_raw(frame(raw_msg(pages(0, BASE, 1).to_wire())))


@attack("commit-request-while-streaming", {"out-of-state"})
def _(p):
    _streaming(p)
    p.send_raw(frame(raw_msg(CommitRequest(0).to_wire())))


@attack("unknown-message-type", {"malformed"})
def _(p):
    p.send_raw(L.PREAMBLE + frame(raw_msg({"type": "format-disk", "now": True})))


@attack("msgpack-nesting-bomb", {"malformed"})
def _(p):
    bomb = b"\x91" * 5000 + b"\x00"        # 5000 nested one-element arrays
    body = b"\x85" + msgpack.packb("type") + msgpack.packb("hello") + \
        msgpack.packb("versions") + bomb
    p.send_raw(L.PREAMBLE + frame(body))


# -- content: mappings and runs ------------------------------------------------------

@attack("pages-outside-mappings", {"bad-pages"})
def _(p):
    _streaming(p)
    p.send_raw(frame(raw_msg(pages(0, BASE + 64 * PAGE_SIZE, 1).to_wire())))


@attack("pages-straddling-mapping-end", {"bad-pages"})
def _(p):
    _streaming(p)
    p.send_raw(frame(raw_msg(pages(0, BASE + 63 * PAGE_SIZE, 2).to_wire())))


@attack("pages-at-address-zero", {"bad-pages"})
def _(p):
    _streaming(p)
    p.send_raw(frame(raw_msg(pages(0, 0, 1).to_wire())))


def _layout_raw(starts, ends, kinds=None, round_=0) -> bytes:
    n = len(starts)
    import numpy as np
    return raw_msg({"type": "layout", "round": round_,
                    "starts": np.array(starts, "<u8").tobytes(),
                    "ends": np.array(ends, "<u8").tobytes(),
                    "offsets": np.zeros(n, "<u8").tobytes(),
                    "perms": bytes([3] * n), "kinds": bytes(kinds or [0] * n),
                    "flags": bytes(n), "path_ends": np.zeros(n, "<u4").tobytes(),
                    "paths": b""})


@attack("layout-overlapping", {"malformed"})
def _(p):
    p.handshake()
    p.send_raw(frame(_layout_raw([BASE, BASE + PAGE_SIZE], [BASE + 4 * PAGE_SIZE,
                                                            BASE + 8 * PAGE_SIZE])))


@attack("layout-start-after-end", {"malformed"})
def _(p):
    p.handshake()
    p.send_raw(frame(_layout_raw([BASE + 8 * PAGE_SIZE], [BASE])))


@attack("layout-beyond-user-space", {"malformed"})
def _(p):
    p.handshake()
    p.send_raw(frame(_layout_raw([BASE], [(1 << 64) - PAGE_SIZE])))


@attack("layout-unaligned", {"malformed"})
def _(p):
    p.handshake()
    p.send_raw(frame(_layout_raw([BASE + 1], [BASE + PAGE_SIZE])))


@attack("layout-too-many-mappings", {"too-large"})
def _(p):
    p.handshake()
    n = L.MAX_MAPPINGS + 1
    starts = [BASE + 2 * i * PAGE_SIZE for i in range(n)]
    p.send_raw(frame(_layout_raw(starts, [s + PAGE_SIZE for s in starts])))


@attack("layout-whole-address-space", {"out-of-state"})
def _(p):
    # One mapping covering all of user space is legal by itself; pages at
    # both ends of it must cost only what is sent (a sparse image), not
    # memory or disk in proportion to the declared size.  An out-of-state
    # message then ends the session.
    p.handshake()
    p.send(Layout(0, (MappingInfo(PAGE_SIZE, L.USER_ADDRESS_LIMIT, "rw-p", 0, "", "anon"),)))
    p.send(pages(0, PAGE_SIZE, 1))
    p.send(pages(0, L.USER_ADDRESS_LIMIT - PAGE_SIZE, 1))
    p.send_raw(frame(raw_msg(CommitRequest(2).to_wire())))


@attack("pages-bad-digest", {"digest"})
def _(p):
    _streaming(p)
    w = pages(0, BASE, 4).to_wire()
    w["digest"] = bytes(16)
    p.send_raw(frame(raw_msg(w)))


# Big batches go from the daemon's socket straight into the image file
# (splice); their digest is taken from the file.  The same answers apply.
BIG = L.MAX_BATCH_PAGES


@attack("big-pages-bad-digest", {"digest"})
def _(p):
    p.handshake()
    p.send(anon_layout(0, BIG))
    w = pages(0, BASE, BIG).to_wire()
    w["digest"] = bytes(16)
    p.send_raw(frame(raw_msg(w)))


@attack("big-pages-outside-layout-refused-before-the-data", {"bad-pages"})
def _(p):
    # Only the head is sent: the daemon must refuse it without waiting for
    # (or storing) 4 MiB of data.
    _streaming(p)
    body = raw_msg(pages(0, BASE + 64 * PAGE_SIZE, BIG).to_wire())
    p.send_raw(frame(body)[:4096])


@attack("big-pages-truncated-then-eof", {"malformed"})
def _(p):
    p.handshake()
    p.send(anon_layout(0, BIG))
    p.send_raw(frame(raw_msg(pages(0, BASE, BIG).to_wire()))[:3 << 20])
    p.half_close()


@attack("big-pages-truncated-then-silence", {"timeout"})
def _(p):
    p.handshake()
    p.send(anon_layout(0, BIG))
    p.send_raw(frame(raw_msg(pages(0, BASE, BIG).to_wire()))[:3 << 20])


@attack("pages-runs-overlapping", {"malformed"})
def _(p):
    _streaming(p)
    w = pages(0, BASE, 3).to_wire()
    w["runs"] = runs_bin([(BASE, 2), (BASE + PAGE_SIZE, 1)])
    p.send_raw(frame(raw_msg(w)))


@attack("round-end-wrong-count", {"bad-pages"})
def _(p):
    _streaming(p)
    p.send(pages(0, BASE, 4))
    p.send_raw(frame(raw_msg(RoundEnd(0, 99, 1, 1.0, 0.0, 1.0, 0.0).to_wire())))


@attack("final-end-wrong-total", {"bad-pages"})
def _(p):
    _streaming(p)
    p.send(pages(0, BASE, 4))
    p.send(RoundEnd(0, 4, 1, 1.0, 0.0, 1.0, 0.0))
    p.send(Freeze(1))
    p.send_raw(frame(raw_msg(FinalEnd(1, 1000).to_wire())))


@attack("commit-request-wrong-count", {"bad-pages"})
def _(p):
    # A whole, well-formed migration whose commit request lies about the
    # pages held: the daemon must refuse to commit -- no image.
    _streaming(p)
    p.send(pages(0, BASE, 4))
    p.send(RoundEnd(0, 4, 1, 1.0, 0.0, 1.0, 0.0))
    p.send(Freeze(1))
    p.send(FinalEnd(1, 4))
    p.send_raw(frame(raw_msg(CommitRequest(64).to_wire())))


# -- quota and sizes ------------------------------------------------------------------

@attack("start-estimate-absurd", {"disk-full", "quota"})
def _(p):
    p.send(hello())
    p.expect_welcome()
    p.send(start(estimated=L.U63_MAX))


# -- withdrawals (SPEC.md 9.2) ---------------------------------------------------------------

@attack("withdraw-bad-image-id", {"malformed"})
def _(p):
    p.send(hello("hostile-w1"))
    p.expect_welcome()
    p.send(Withdraw("etc..passwd"))


@attack("withdraw-inside-a-migration", {"out-of-state"})
def _(p):
    _streaming(p)
    p.send_raw(frame(raw_msg(Withdraw("20260101-000000.000-0123456789").to_wire())))


# -- peers that never finish ------------------------------------------------------------

@attack("keepalives-instead-of-hello", {"timeout"})
def _(p):
    # The handshake must complete within its timeout however chatty the
    # peer is (wire limits: "Preamble + Hello/Welcome + Start/Accept must
    # complete within HANDSHAKE_TIMEOUT_S").
    import time
    deadline = time.monotonic() + 3 * CLOSE_WITHIN_S
    i = 0
    while time.monotonic() < deadline:
        if not p.send(Keepalive(i)):
            return
        i += 1
        p._pull(0.5)
        if p.closed:
            return


# Attacks whose whole connection must end within CLOSE_WITHIN_S, however
# long the attacker keeps talking.
BOUNDED_IN_TOTAL = {"keepalives-instead-of-hello"}


def LENGTH(n: int) -> bytes:
    return n.to_bytes(4, "big")


# -- the tests --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack(env, name):
    fn, codes = ATTACKS[name]
    dst = env.dst
    rss_before = env.sample()
    with RawPeer("127.0.0.1", dst.port) as p:
        t0 = time.monotonic()
        fn(p)
        attack_s = time.monotonic() - t0
        out = p.finish(timeout=CLOSE_WITHIN_S)
    print(name, out, "rss", dst.rss_kib())
    assert out.closed, f"{name}: the daemon did not close the connection within " \
                       f"{CLOSE_WITHIN_S:g} s ({out})"
    # Bounded in total, not only after the peer went quiet: a chatty peer
    # (keepalives) must not keep a session that never gets anywhere.
    if name in BOUNDED_IN_TOTAL:
        attack_s = 0.0
    assert out.lifetime_s - attack_s <= CLOSE_WITHIN_S, \
        f"{name}: the connection lived {out.lifetime_s:.1f} s ({out})"
    assert out.undecodable is None, f"{name}: the daemon's answer did not decode: {out}"
    assert out.error_code in codes, f"{name}: expected Error {codes}, got {out}"
    assert dst.alive, f"{name}: the daemon died:\n{dst.log_tail()}"
    rss = env.sample()
    assert rss - rss_before <= ATTACK_RSS_GROWTH_KIB, \
        f"{name}: daemon RSS grew {(rss - rss_before) / 1024:.1f} MiB during the attack"
    hostile = [r for r in dst.images() if str(r.get("migration_id", "")).startswith("hostile")]
    assert not hostile, f"{name}: a hostile migration left a complete image: {hostile}"


def test_quota_enforced_before_and_during_data(env):
    """A destination with --image-quota refuses a Start whose estimate does
    not fit, and cuts off a source that sends more than it said."""
    q = env.cluster.daemon("dst-quota", tls=False,
                           extra=["--image-quota", "4M", "--min-free", "1M"])
    try:
        # 1. The estimate alone is over the quota: refused at Accept.
        with RawPeer("127.0.0.1", q.port) as p:
            p.send(hello())
            p.expect_welcome()
            p.send(start(estimated=8 << 20))
            out = p.finish(CLOSE_WITHIN_S)
        assert out.closed and out.error_code == "quota", f"{out}\n{q.log_tail()}"
        # 2. Estimate 0, then more page data than the quota.
        with RawPeer("127.0.0.1", q.port) as p:
            acc = p.handshake(estimated=0)
            assert acc.quota_bytes <= 4 << 20, acc
            p.send(anon_layout(0, 4096))
            # 5 x 1024 pages = 20 MiB against a 4 MiB quota, one batch at a
            # time, listening in between (a peer still sending when the
            # daemon closes gets a reset instead of the Error: see report).
            for i in range(5):
                if not p.send_raw(frame(raw_msg(pages(0, BASE + i * 1024 * PAGE_SIZE,
                                                      1024).to_wire()))):
                    break
                p._pull(1.0)
                if p.closed or p.events:
                    break
            out = p.finish(CLOSE_WITHIN_S)
        assert out.closed and out.error_code == "quota", f"{out}\n{q.log_tail()}"
        assert not q.images() and not q.partials()
        assert q.rss_kib() < RSS_LIMIT_KIB
    finally:
        q.close()


def test_no_partial_left_behind(env):
    """Every hostile session aborted its writer (only the legitimate
    migration may be writing)."""
    wait_until(lambda: len(env.dst.partials()) <= 1, CLOSE_WITHIN_S, "partials removed")


def test_daemon_memory_stayed_bounded(env):
    """Over all the attacks and legitimate migrations above, the daemon's
    resident memory never reached the limit (sampled after every attack)."""
    env.sample()
    assert env.rss_peak_kib < RSS_LIMIT_KIB, \
        f"destination RSS peaked at {env.rss_peak_kib / 1024:.0f} MiB " \
        f"(limit {RSS_LIMIT_KIB / 1024:.0f} MiB) after {len(ATTACKS)} attacks and " \
        f"{len(env.legit.results)} legitimate migrations"


def test_legitimate_migrations_carried_on(env):
    """The legitimate migrations that ran during all of the above succeeded."""
    env.legit.stop()
    res = env.legit.results
    assert not env.legit.errors, env.legit.errors
    assert res, "no legitimate migration ran"
    bad = [r for r in res if r.get("status") != "completed"]
    assert not bad, bad
    print(f"legitimate migrations during the attacks: {len(res)}; "
          f"destination RSS peak {env.rss_peak_kib} KiB")


def test_withdraw_answers_absent_for_unknown_images(env):
    """A withdrawal of nothing is answered, not an error: a source retrying
    after a lost answer must be able to finish.  (Who may withdraw what:
    tests/engine/test_three_way_commit.py.)"""
    with RawPeer("127.0.0.1", env.dst.port) as p:
        p.send(hello("hostile-w2"))
        p.expect_welcome()
        p.send(Withdraw("20260101-000000.000-0123456789"))
        out = p.finish(timeout=CLOSE_WITHIN_S)
    assert out.closed and out.error_code is None, out
    assert Withdrawn("20260101-000000.000-0123456789", "absent") in out.events, out

