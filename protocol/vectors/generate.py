#!/usr/bin/env python3
"""Regenerate the golden vectors of protocol v1: index.json + bin/*.bin.

    .venv/bin/python protocol/vectors/generate.py

Each vector is a script run against one role ("dest" or "source"): "send"
steps are events that side sends (as JSON, see migrated/wire/jsonform.py);
"recv" steps feed a binary file of peer bytes (optionally followed by end
of stream) and list the events that must come out, then the error code
that must be raised (or null).  Invalid frames are built by hand with raw
msgpack so they do not depend on our encoder; valid ones come from the
encoder and are marked "canonical": re-encoding the expected events must
give exactly the file's bytes.  Vectors assume 4096-byte pages.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import msgpack
import xxhash

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from migrated.runs import PageRuns  # noqa: E402
from migrated.wire import limits as L  # noqa: E402
from migrated.wire.events import (Accept, Backlog, Cancel, CommitRequest, Committed,  # noqa: E402
                                  ConnectionClosed, Dropped, Error, FinalEnd,
                                  Freeze, Hello, Keepalive, Layout, MappingInfo,
                                  Pages, Release, Released, RoundEnd, Start,
                                  Withdraw, Withdrawn,
                                  Welcome, Zeros)
from migrated.wire.frames import encode  # noqa: E402
from migrated.wire.jsonform import event_to_json  # noqa: E402

PAGE = 4096
P = L.PREAMBLE
BASE = 0x7F0000000000


def pg(n: int) -> int:
    return n * PAGE


def lp(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def raw(d: dict) -> bytes:
    """A frame from a raw map, no checks at all."""
    return lp(msgpack.packb(d, use_bin_type=True))


def map32(d: dict) -> bytes:
    """A frame whose body is ``d`` as a msgpack map32 (0xdf + u32 count),
    the widest map form, even for a few entries."""
    body = b"\xdf" + struct.pack(">I", len(d)) + b"".join(
        msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in d.items())
    return lp(body)


def runs_bin(pairs) -> bytes:
    return b"".join(struct.pack("<QQ", a, n) for a, n in pairs)


def data_of(npages: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(npages * PAGE))


HELLO = Hello((1,), "node-a.example", ("zero-pages",), "mig-0001")
WELCOME = Welcome(1, "node-b.example", ())
START = Start(4242, ("/usr/bin/app", "--serve", "port=80"), "/usr/bin/app", PAGE,
              "soft-dirty", pg(48), {"downtime_ms": 300, "verbose": False})
ACCEPT = Accept(16, pg(256))
MAPS0 = (
    MappingInfo(BASE, BASE + pg(32), "rw-p", 0, "", "anon"),
    MappingInfo(BASE + pg(32), BASE + pg(48), "r--p", pg(2), "/usr/lib/libc.so.6", "file"),
    MappingInfo(BASE + pg(64), BASE + pg(72), "rw-s", 0, "/dev/shm/ring", "shared-file"),
    MappingInfo(0x7FFFF0000000, 0x7FFFF0021000, "rw-p", 0, "[stack]", "anon", 4),
    MappingInfo(0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000, "--xp", 0, "[vsyscall]", "skip"),
)
LAYOUT0 = Layout(0, MAPS0)
RUNS0 = PageRuns.from_pairs([(BASE, 2), (BASE + pg(31), 2)])  # crosses anon|file
PAGES0 = Pages.build(0, RUNS0, data_of(4))
ZEROS0 = Zeros(0, PageRuns.from_pairs([(BASE + pg(5), 3)]))
DROPPED0 = Dropped(0, PageRuns.from_pairs([(BASE + pg(40), 1)]))
ROUNDEND0 = RoundEnd(0, 4, 20000, 12.5, 1048576.0, 8.0e8, 0.25)
LAYOUT1 = Layout(1, MAPS0[:2] + MAPS0[3:])
PAGES1 = Pages.build(1, PageRuns.from_pairs([(0x7FFFF0020000, 1)]), data_of(1, 9))
FREEZE1 = Freeze(1)
FINAL1 = FinalEnd(1, 5)
COMMIT = CommitRequest(9, bytes(range(16)))
COMMITTED = Committed("img-20240101-0001", "xxh3-128:00112233445566778899aabbccddeeff")
RELEASE = Release(COMMITTED.image_id)
RELEASED = Released(COMMITTED.image_id)
WITHDRAW = Withdraw(COMMITTED.image_id)
WITHDRAWN = Withdrawn(COMMITTED.image_id, "removed")

# The "backlog" capability: offered by the source, accepted by the destination.
HELLO_BL = Hello((1,), "node-a.example", ("zero-pages", "backlog"), "mig-0002")
WELCOME_BL = Welcome(1, "node-b.example", ("backlog",))

VECTORS: list[dict] = []


def vec(name: str, role: str, description: str, steps: list) -> None:
    VECTORS.append({"name": name, "role": role, "description": description,
                    "steps": steps})


def send(ev):
    return ("send", ev)


def recv(data: bytes, expect=(), error=None, eof=False, canonical=False):
    return ("recv", data, list(expect), error, eof, canonical)


def ok(*evs, preamble=False):
    """A recv step of valid frames produced by our encoder."""
    data = (P if preamble else b"") + b"".join(encode(e) for e in evs)
    return recv(data, evs, canonical=not preamble)


def okp(*evs):
    return ok(*evs, preamble=True)


DEST_STREAMING = [okp(HELLO), send(WELCOME), ok(START), send(ACCEPT), ok(LAYOUT0)]
SOURCE_STREAMING = [send(HELLO), okp(WELCOME), send(START), ok(ACCEPT)]


def dest_bad(name: str, frame: bytes, error: str, description: str,
             prefix=None) -> None:
    steps = list(DEST_STREAMING if prefix is None else prefix)
    steps.append(recv(frame, (), error))
    vec(name, "dest", description, steps)


def dest_first(name: str, data: bytes, error: str | None, description: str,
               expect=(), eof=False) -> None:
    vec(name, "dest", description, [recv(data, expect, error, eof)])


def build() -> None:
    # -- valid conversations ---------------------------------------------------
    vec("full-migration", "dest",
        "a complete migration seen by the destination: two rounds, a layout "
        "change, zero and dropped pages, commit, orderly close",
        DEST_STREAMING + [
            ok(PAGES0, ZEROS0, DROPPED0, Keepalive(7), ROUNDEND0),
            ok(FREEZE1, LAYOUT1, PAGES1, FINAL1, COMMIT),
            send(COMMITTED), ok(Keepalive(8), RELEASE), send(RELEASED),
            recv(b"", [ConnectionClosed(True)], eof=True)])
    vec("full-migration-source", "source",
        "the source's view: welcome, accept, keepalives, committed, release, "
        "released, close",
        SOURCE_STREAMING + [
            send(LAYOUT0), send(PAGES0), ok(Keepalive(0)), send(ROUNDEND0),
            send(FREEZE1), send(FinalEnd(1, 4)), send(CommitRequest(4)),
            ok(Keepalive(2 ** 64 - 1), COMMITTED), send(RELEASE),
            ok(Keepalive(3), RELEASED),
            recv(b"", [ConnectionClosed(True)], eof=True)])
    vec("source-receives-error", "source",
        "the destination refuses with an error code we do not know; "
        "the connection closes",
        [send(HELLO), recv(P + raw({"type": "error", "code": "future-code",
                                    "message": "try later"}),
                           [Error("future-code", "try later")]),
         recv(b"", [ConnectionClosed(True)], eof=True)])
    vec("dest-refuses-busy", "dest",
        "a destination may send error before reading anything",
        [send(Error("busy", "too many migrations")), recv(b"", [], None)])
    vec("cancel-while-streaming", "dest", "the source cancels mid-round",
        DEST_STREAMING + [ok(PAGES0, Cancel("operator asked")),
                          recv(b"", [ConnectionClosed(True)], eof=True)])
    vec("eof-mid-stream", "dest",
        "the source vanishes between frames: not clean",
        DEST_STREAMING + [recv(b"", [ConnectionClosed(False)], eof=True)])
    vec("hello-limits", "dest", "hello at its limits: 16 versions, 32 capabilities, "
        "255-byte node, 64-byte id",
        [recv(P + raw({"type": "hello", "versions": list(range(1, 17)),
                       "node": "n" * 255,
                       "capabilities": [f"cap-{i}" for i in range(32)],
                       "migration_id": "m" * 64}),
              [Hello(tuple(range(1, 17)), "n" * 255,
                     tuple(f"cap-{i}" for i in range(32)), "m" * 64)])])
    vec("hello-map16-str8", "dest",
        "non-minimal msgpack forms (map16, str8 type) are accepted",
        [recv(P + lp(b"\xde\x00\x05" + b"\xd9\x04type" + b"\xd9\x05hello"
                     + msgpack.packb("versions") + msgpack.packb([1])
                     + msgpack.packb("node") + msgpack.packb("a")
                     + msgpack.packb("capabilities") + msgpack.packb([])
                     + msgpack.packb("migration_id") + msgpack.packb("x")),
              [Hello((1,), "a", (), "x")])])
    vec("hello-map32", "dest",
        "a body encoded as a map32 (the widest map form) is accepted; the "
        "type is read from its first 51 bytes at most",
        [recv(P + map32({"type": "hello", "versions": [1], "node": "a",
                         "capabilities": [], "migration_id": "x"}),
              [Hello((1,), "a", (), "x")])])
    vec("pages-map32", "dest",
        "a pages body as a map32 is accepted (decoded whole, not by the "
        "fast path for the usual shape)",
        DEST_STREAMING + [recv(map32({"type": "pages", "round": 0,
                                      "runs": runs_bin([(BASE, 1)]),
                                      "digest": xxhash.xxh3_128_digest(data_of(1)),
                                      "data": data_of(1)}),
                               [Pages.build(0, PageRuns.from_pairs([(BASE, 1)]),
                                            data_of(1))])])
    dest_first("map32-empty", P + lp(b"\xdf\x00\x00\x00\x00"), "malformed",
               "an empty map32 body")
    dest_first("map32-count-over-fields",
               P + lp(b"\xdf\x00\x01\x00\x00\xa4type\xa9keepalive\xa3seq\x01"),
               "malformed", "a map32 declaring 65536 entries for a 2-field message: "
               "refused from its count, before any entry is built")
    vec("zeros-capability", "source",
        "the zeros capability offered and echoed (informational in v1: zeros "
        "is legal without it too)",
        [send(Hello((1,), "node-a.example", ("zeros",), "mig-0003")),
         okp(Welcome(1, "node-b.example", ("zeros",))), send(START), ok(ACCEPT),
         send(LAYOUT0), send(ZEROS0)])
    vec("error-unknown-code", "dest",
        "an error with a code we do not know is decoded as it is; the "
        "receiver treats it as internal (SPEC.md 13)",
        DEST_STREAMING + [recv(raw({"type": "error", "code": "made-up-code",
                                    "message": "bye"}),
                               [Error("made-up-code", "bye")])])
    vec("commit-request-digest-reserved", "dest",
        "commit-request.digest is reserved: any 16 bytes are accepted "
        "(never compared)",
        DEST_STREAMING + [ok(Freeze(0), FinalEnd(0, 0),
                             CommitRequest(0, b"\xff" * 16))])
    vec("adjacent-runs-merge", "dest", "adjacent runs are accepted and merged",
        DEST_STREAMING + [recv(raw({"type": "zeros", "round": 0,
                                    "runs": runs_bin([(BASE, 1), (BASE + pg(1), 2)])}),
                               [Zeros(0, PageRuns.from_pairs([(BASE, 3)]))])])
    vec("commit-request-nil-digest", "dest", "a nil digest means no digest",
        DEST_STREAMING + [ok(Freeze(0), FinalEnd(0, 0)),
                          recv(raw({"type": "commit-request", "pages": 0,
                                    "digest": None}), [CommitRequest(0)])])
    big_int = {"type": "keepalive", "seq": 2 ** 64 - 1}
    vec("integer-limits-ok", "dest", "integer fields at their upper limits",
        [recv(P + raw({"type": "hello", "versions": [1, L.MAX_VERSION_NUMBER],
                       "node": "a", "capabilities": [], "migration_id": "m"}),
              [Hello((1, L.MAX_VERSION_NUMBER), "a", (), "m")]),
         send(Welcome(1, "b", ())),
         recv(raw({"type": "start", "pid": L.PID_MAX_LIMIT, "cmdline": b"",
                   "exe": b"/x", "page_size": PAGE, "tracker": "digest",
                   "estimated_bytes": L.U63_MAX, "options": {}}),
              [Start(L.PID_MAX_LIMIT, (), "/x", PAGE, "digest", L.U63_MAX, {})]),
         send(Accept(L.MAX_BATCH_PAGES, L.U63_MAX)),
         recv(raw(big_int), [Keepalive(2 ** 64 - 1)])])

    # -- preamble and framing --------------------------------------------------
    dest_first("preamble-http", b"GET / HTTP/1.1\r\n", "malformed",
               "an HTTP client is refused on the first byte")
    dest_first("preamble-tls", b"\x16\x03\x01\x02\x00\x01", "malformed",
               "a TLS ClientHello on a plaintext port is refused")
    dest_first("preamble-version-2", b"MIGRATD\x02", "version",
               "right magic, unknown framing version")
    dest_first("preamble-truncated", b"MIGR", "malformed",
               "end of stream inside the preamble", eof=True)
    dest_first("silent-close", b"", None, "peer closes without a byte: not clean",
               expect=[ConnectionClosed(False)], eof=True)
    dest_first("length-max-u32", P + b"\xff\xff\xff\xff", "too-large",
               "a 4 GiB length prefix is refused before any body arrives")
    dest_first("length-over-handshake-limit",
               P + struct.pack(">I", L.MAX_CONTROL_FRAME + 1), "too-large",
               "before hello only small frames may be declared")
    dest_first("length-at-handshake-limit-truncated",
               P + struct.pack(">I", L.MAX_CONTROL_FRAME) + b"\x84\xa4type\xa5hello",
               "malformed", "a frame at the limit is fine until the stream ends "
               "inside it", eof=True)
    dest_first("length-zero", P + b"\x00\x00\x00\x00", "malformed", "empty frame")
    dest_first("body-not-map", P + lp(msgpack.packb([1, 2])), "malformed",
               "the body must be a map")
    dest_first("first-key-not-type", P + raw({"node": "a", "type": "hello"}),
               "malformed", '"type" must be the first key')
    dest_first("type-not-str", P + lp(b"\x81\xa4type\x01"), "malformed",
               "the type must be a string")
    dest_first("unknown-type", P + raw({"type": "teleport", "x": 1}), "malformed",
               "an unknown message type")
    dest_first("frame-truncated", P + encode(HELLO)[:-3], "malformed",
               "end of stream inside a frame", eof=True)
    dest_first("trailing-bytes-in-frame", P + lp(msgpack.packb(
        {"type": "keepalive", "seq": 1}) + b"\xc0"), "malformed",
        "bytes after the map inside a frame")
    dest_first("not-msgpack", P + lp(b"\x82\xa4type\xa9keepalive\xc1\xc1"),
               "malformed", "0xc1 is never used in msgpack")
    dest_first("duplicate-key", P + lp(b"\x83\xa4type\xa9keepalive\xa3seq\x01\xa3seq\x02"),
               "malformed", "a key given twice")
    dest_first("ext-type", P + lp(b"\x82\xa4type\xa9keepalive\xa3seq\xd4\x05\x00"),
               "malformed", "msgpack extension types are refused")
    dest_first("timestamp-ext", P + lp(b"\x82\xa4type\xa9keepalive\xa3seq"
                                       b"\xd6\xff\x00\x00\x00\x01"),
               "malformed", "even the standard timestamp extension")
    dest_first("unknown-field", P + raw({"type": "keepalive", "seq": 1, "extra": 2}),
               "malformed", "unknown fields are rejected in v1")
    dest_first("missing-field", P + raw({"type": "hello", "versions": [1],
                                         "node": "a", "capabilities": []}),
               "malformed", "hello without migration_id")
    dest_first("nested-array", P + raw({"type": "keepalive", "seq": [[1]]}),
               "malformed", "arrays where the type allows none")
    dest_first("nested-map", P + raw({"type": "keepalive", "seq": {"a": {}}}),
               "malformed", "maps nested in a type that has none")

    # -- wrong types and integer limits -----------------------------------------
    ka = lambda v: P + raw({"type": "keepalive", "seq": v})  # noqa: E731
    dest_first("keepalive-seq-str", ka("1"), "malformed", "string for an integer")
    dest_first("keepalive-seq-bool", ka(True), "malformed", "bool is not an integer")
    dest_first("keepalive-seq-float", ka(1.0), "malformed", "float is not an integer")
    dest_first("keepalive-seq-negative", ka(-1), "malformed", "negative seq")
    dest_first("keepalive-seq-nil", ka(None), "malformed", "nil seq")
    dest_first("keepalive-seq-bin", ka(b"\x01"), "malformed", "bin seq")
    hello = lambda **kw: P + raw({"type": "hello", "versions": [1], "node": "a",  # noqa: E731
                                  "capabilities": [], "migration_id": "m", **kw})
    dest_first("hello-versions-str", hello(versions="1"), "malformed", "versions as str")
    dest_first("hello-versions-empty", hello(versions=[]), "malformed", "no versions")
    dest_first("hello-versions-17", hello(versions=list(range(1, 18))), "too-large",
               "more versions than MAX_VERSIONS")
    dest_first("hello-version-zero", hello(versions=[0, 1]), "malformed", "version 0")
    dest_first("hello-version-65536", hello(versions=[1, 65536]), "malformed",
               "version above MAX_VERSION_NUMBER")
    dest_first("hello-version-dup", hello(versions=[1, 1]), "malformed", "repeated")
    dest_first("hello-no-common-version", hello(versions=[2, 3]), "version",
               "nothing in common: the destination answers error(version)")
    dest_first("hello-node-256", hello(node="n" * 256), "too-large",
               "node over 255 bytes (msgpack str limit)")
    dest_first("hello-node-control", hello(node="a\nb"), "malformed",
               "control characters in a node name")
    dest_first("hello-node-empty", hello(node=""), "malformed", "empty node name")
    dest_first("hello-id-slash", hello(migration_id="../../etc"), "malformed",
               "a migration id is a token, never a path")
    dest_first("hello-id-65", hello(migration_id="m" * 65), "too-large",
               "migration id over 64 bytes")
    dest_first("hello-caps-33", hello(capabilities=[f"c{i}" for i in range(33)]),
               "too-large", "more than 32 capabilities")
    dest_first("hello-caps-int", hello(capabilities=[1]), "malformed",
               "capability that is not a string")
    dest_first("hello-utf8-invalid", P + lp(b"\x84\xa4type\xa5hello\xa8versions\x91\x01"
                                            b"\xa4node\xa2\xff\xfe\xacmigration_id\xa1m"),
               "malformed", "invalid UTF-8 in a str")
    hs = [okp(HELLO), send(WELCOME)]

    def start(**kw):
        d = {"type": "start", "pid": 1, "cmdline": b"a\0", "exe": b"/a",
             "page_size": PAGE, "tracker": "soft-dirty", "estimated_bytes": 0,
             "options": {}}
        d.update(kw)
        return raw(d)
    dest_bad("start-pid-zero", start(pid=0), "malformed", "pid 0", hs)
    dest_bad("start-pid-over-max", start(pid=L.PID_MAX_LIMIT + 1), "malformed",
             "pid above PID_MAX_LIMIT", hs)
    dest_bad("start-page-size-4097", start(page_size=4097), "malformed",
             "not a power of two", hs)
    dest_bad("start-page-size-2048", start(page_size=2048), "malformed",
             "below MIN_PAGE_SIZE", hs)
    dest_bad("start-page-size-65536", start(page_size=65536), "unsupported",
             "valid, but v1 needs equal page sizes on both ends", hs)
    dest_bad("start-estimated-2-63", start(estimated_bytes=2 ** 63), "malformed",
             "estimated_bytes above 2**63-1", hs)
    dest_bad("start-estimated-u64-max", start(estimated_bytes=2 ** 64 - 1), "malformed",
             "estimated_bytes u64 max", hs)
    dest_bad("start-cmdline-unterminated", start(cmdline=b"a\0b"), "malformed",
             "cmdline must end with NUL", hs)
    dest_bad("start-cmdline-str", start(cmdline="a"), "malformed",
             "cmdline is bin, not str", hs)
    dest_bad("start-exe-nul", start(exe=b"/a\0b"), "malformed", "NUL in exe", hs)
    dest_bad("start-option-nested", start(options={"a": [1]}), "malformed",
             "option values are scalars", hs)
    dest_bad("start-option-key", start(options={"a b": 1}), "malformed",
             "option keys are tokens", hs)
    dest_bad("start-options-33", start(options={f"o{i}": i for i in range(33)}),
             "too-large", "more than 32 options", hs)
    dest_bad("start-option-int-key", lp(msgpack.packb(
        {"type": "start", "pid": 1, "cmdline": b"", "exe": b"/a", "page_size": PAGE,
         "tracker": "t", "estimated_bytes": 0, "options": {1: 2}},
        use_bin_type=True)), "malformed", "non-string map key", hs)
    src_hs = [send(HELLO), okp(WELCOME), send(START)]
    vec("accept-batch-1025", "source", "max_batch_pages above MAX_BATCH_PAGES",
        src_hs + [recv(raw({"type": "accept", "max_batch_pages": 1025,
                            "quota_bytes": 1}), (), "malformed")])
    vec("accept-batch-zero", "source", "max_batch_pages 0",
        src_hs + [recv(raw({"type": "accept", "max_batch_pages": 0,
                            "quota_bytes": 1}), (), "malformed")])
    vec("accept-quota-2-63", "source", "quota above 2**63-1",
        src_hs + [recv(raw({"type": "accept", "max_batch_pages": 1,
                            "quota_bytes": 2 ** 63}), (), "malformed")])
    vec("welcome-unoffered-version", "source", "welcome picks a version not offered",
        [send(HELLO), recv(P + raw({"type": "welcome", "version": 2, "node": "b",
                                    "capabilities": []}), (), "version")])
    vec("welcome-unoffered-capability", "source",
        "welcome names a capability hello did not offer",
        [send(HELLO), recv(P + raw({"type": "welcome", "version": 1, "node": "b",
                                    "capabilities": ["xbzrle"]}), (), "malformed")])
    re = lambda **kw: raw({"type": "round-end", "round": 0, "pages": 0, "bytes": 0,  # noqa
                           "duration_ms": 0, "dirty_rate": 0, "bandwidth": 0,
                           "pause_ms": 0, **kw})
    dest_bad("round-end-nan", re(duration_ms=float("nan")), "malformed", "NaN figure")
    dest_bad("round-end-inf", re(bandwidth=float("inf")), "malformed", "infinite figure")
    dest_bad("round-end-negative", re(pause_ms=-1.0), "malformed", "negative figure")
    dest_bad("round-end-round-u32-over", re(round=2 ** 32), "malformed",
             "round above MAX_ROUND")
    dest_bad("round-end-wrong-pages", re(pages=3), "bad-pages",
             "round-end claims pages that never arrived")
    dest_bad("commit-digest-short", raw({"type": "commit-request", "pages": 0,
                                         "digest": b"\0" * 15}), "malformed",
             "a 15-byte digest",
             DEST_STREAMING + [ok(Freeze(0), FinalEnd(0, 0))])

    # -- layout ---------------------------------------------------------------
    def layout(maps, **kw):
        d = {"type": "layout", "round": 0,
             "starts": b"".join(struct.pack("<Q", m[0]) for m in maps),
             "ends": b"".join(struct.pack("<Q", m[1]) for m in maps),
             "offsets": b"\0" * 8 * len(maps), "perms": b"\x03" * len(maps),
             "kinds": bytes(m[2] for m in maps), "flags": b"\0" * len(maps),
             "path_ends": b"\0" * 4 * len(maps), "paths": b""}
        d.update(kw)
        return raw(d)
    lhs = [okp(HELLO), send(WELCOME), ok(START), send(ACCEPT)]
    dest_bad("layout-overlap", layout([(BASE, BASE + pg(2), 0), (BASE + pg(1), BASE + pg(3), 0)]),
             "malformed", "overlapping mappings", lhs)
    dest_bad("layout-unsorted", layout([(BASE + pg(4), BASE + pg(5), 0), (BASE, BASE + pg(1), 0)]),
             "malformed", "mappings out of order", lhs)
    dest_bad("layout-unaligned", layout([(BASE + 1, BASE + pg(1), 0)]), "malformed",
             "start not page aligned", lhs)
    dest_bad("layout-empty-mapping", layout([(BASE, BASE, 0)]), "malformed",
             "start == end", lhs)
    dest_bad("layout-kernel-space", layout([(L.USER_ADDRESS_LIMIT, L.USER_ADDRESS_LIMIT + PAGE, 0)]),
             "malformed", "an anonymous mapping above the user address space", lhs)
    dest_bad("layout-bad-kind", layout([(BASE, BASE + PAGE, 9)]), "malformed",
             "unknown kind code", lhs)
    dest_bad("layout-column-mismatch", layout([(BASE, BASE + PAGE, 0)], ends=b""),
             "malformed", "columns of different lengths", lhs)
    dest_bad("layout-path-ends-past", layout([(BASE, BASE + PAGE, 0)],
                                             path_ends=struct.pack("<I", 5)),
             "malformed", "path_ends beyond the paths bytes", lhs)
    dest_bad("layout-wrong-round", layout([(BASE, BASE + PAGE, 0)], round=1),
             "out-of-state", "layout for a round not yet begun", lhs)

    # -- pages ----------------------------------------------------------------
    def pages(pairs, data, digest=None, **kw):
        d = {"type": "pages", "round": 0, "runs": runs_bin(pairs),
             "digest": xxhash.xxh3_128_digest(data) if digest is None else digest,
             "data": data}
        d.update(kw)
        return raw(d)
    one = data_of(1)
    dest_bad("pages-before-layout", pages([(BASE, 1)], one), "out-of-state",
             "pages before any layout", lhs)
    dest_bad("pages-in-idle", P + pages([(BASE, 1)], one), "out-of-state",
             "pages as the first message (refused from its type alone)", [])
    dest_bad("pages-digest", pages([(BASE, 1)], one, digest=b"\0" * 16), "digest",
             "data that does not match its digest")
    dest_bad("pages-digest-len", pages([(BASE, 1)], one, digest=b"\0" * 8), "malformed",
             "an 8-byte digest")
    dest_bad("pages-outside-layout", pages([(BASE + pg(50), 1)], one), "bad-pages",
             "a run in a gap between mappings")
    dest_bad("pages-shared-file", pages([(BASE + pg(64), 1)], one), "bad-pages",
             "a run in a shared file mapping (recorded, never copied)")
    dest_bad("pages-past-mapping-end", pages([(BASE + pg(47), 2)], data_of(2)),
             "bad-pages", "a run that starts inside and ends outside")
    dest_bad("pages-vsyscall", pages([(0xFFFFFFFFFF600000, 1)], one), "malformed",
             "a run above the user address space")
    dest_bad("pages-unaligned", pages([(BASE + 8, 1)], one), "malformed",
             "run start not page aligned")
    dest_bad("pages-zero-count", pages([(BASE, 0)], b""), "malformed", "run of 0 pages")
    dest_bad("pages-overlap", pages([(BASE, 2), (BASE + pg(1), 1)], data_of(3)),
             "malformed", "overlapping runs")
    dest_bad("pages-unsorted", pages([(BASE + pg(4), 1), (BASE, 1)], data_of(2)),
             "malformed", "runs out of order")
    dest_bad("pages-runs-not-16", pages([(BASE, 1)], one, runs=runs_bin([(BASE, 1)])[:-1]),
             "malformed", "runs bin not a multiple of 16 bytes")
    dest_bad("pages-no-runs", pages([], b""), "malformed", "an empty batch")
    dest_bad("pages-short-data", pages([(BASE, 2)], one), "malformed",
             "data shorter than the runs")
    dest_bad("pages-over-accepted-batch", pages([(BASE, 17)], data_of(17)), "too-large",
             "17 pages when accept said 16")
    dest_bad("pages-wrong-round", pages([(BASE, 1)], one, round=1), "out-of-state",
             "pages for round 1 during round 0")
    dest_bad("pages-count-overflow", pages([(BASE, 2 ** 64 - 1)], b""), "malformed",
             "a count that would wrap the address space")
    dest_bad("pages-type-over-frame-limit",
             struct.pack(">I", L.MAX_PAGES_FRAME + 1) + b"\x85\xa4type\xa5pages",
             "too-large", "a pages frame declared above MAX_PAGES_FRAME is refused "
             "from its first bytes")
    vec("pages-over-quota", "dest",
        "accept.quota_bytes is 4 pages: 4 arrive, the fifth is refused",
        [okp(HELLO), send(WELCOME), ok(START), send(Accept(16, pg(4))), ok(LAYOUT0),
         ok(Pages.build(0, PageRuns.from_pairs([(BASE, 4)]), data_of(4))),
         recv(pages([(BASE + pg(4), 1)], one), (), "quota")])
    dest_bad("zeros-outside-layout",
             raw({"type": "zeros", "round": 0, "runs": runs_bin([(BASE + pg(48), 1)])}),
             "bad-pages", "zero pages outside the migratable mappings")
    dest_bad("dropped-bad-round",
             raw({"type": "dropped", "round": 3, "runs": runs_bin([(BASE, 1)])}),
             "out-of-state", "dropped for a future round")

    # -- out of state -----------------------------------------------------------
    dest_first("start-before-hello", P + encode(START), "out-of-state",
               "start as the first message")
    vec("hello-twice", "dest", "a second hello",
        [okp(HELLO), send(WELCOME), recv(encode(HELLO), (), "out-of-state")])
    vec("start-before-welcome", "dest", "start while the destination has not "
        "answered hello", [okp(HELLO), recv(encode(START), (), "out-of-state")])
    dest_bad("commit-while-streaming", encode(COMMIT), "out-of-state",
             "commit-request before freeze and final-end")
    dest_bad("round-end-after-freeze", encode(RoundEnd(0, 0, 0, 0, 0, 0, 0)),
             "out-of-state", "no round-end in the frozen round",
             DEST_STREAMING + [ok(Freeze(0))])
    dest_bad("freeze-wrong-round", encode(Freeze(1)), "out-of-state",
             "freeze naming a round that is not next")
    dest_bad("final-end-before-layout", encode(FinalEnd(0, 0)), "out-of-state",
             "final-end needs a layout, like every message of a round "
             "(stop-and-copy sends freeze, then its layout)",
             [okp(HELLO), send(WELCOME), ok(START), send(ACCEPT), ok(Freeze(0))])
    dest_bad("final-end-wrong-total", encode(FinalEnd(0, 1)), "bad-pages",
             "final-end counting pages that never came",
             DEST_STREAMING + [ok(Freeze(0))])
    dest_bad("dest-receives-welcome", encode(WELCOME), "out-of-state",
             "a destination-only message sent by the source", [okp(HELLO)])
    vec("source-receives-pages", "source", "a source-only message from the dest",
        SOURCE_STREAMING + [recv(encode(PAGES1), (), "out-of-state")])
    vec("source-receives-committed-early", "source", "committed while streaming",
        SOURCE_STREAMING + [recv(encode(COMMITTED), (), "out-of-state")])
    vec("source-large-frame", "source",
        "a destination never sends more than a control frame",
        SOURCE_STREAMING + [recv(struct.pack(">I", L.MAX_CONTROL_FRAME + 1), (),
                                 "too-large")])
    src_done = SOURCE_STREAMING + [send(LAYOUT0), send(Freeze(0)), send(FinalEnd(0, 0)),
                                   send(CommitRequest(0))]
    dst_commit = DEST_STREAMING + [ok(Freeze(0), FinalEnd(0, 0), CommitRequest(0))]
    vec("cancel-after-done", "source", "cancel after released",
        src_done + [ok(COMMITTED), send(RELEASE), ok(RELEASED),
                    recv(encode(Cancel("late")), (), "out-of-state")])

    # -- resolving a migration in doubt: withdraw / withdrawn --------------------
    vec("withdraw", "dest",
        "a source that never saw released asks to withdraw the image: hello, "
        "welcome, withdraw, withdrawn, orderly close",
        [okp(HELLO), send(WELCOME), ok(WITHDRAW), send(WITHDRAWN),
         recv(b"", [ConnectionClosed(True)], eof=True)])
    vec("withdraw-source", "source",
        "the source's view of a withdrawal; the image was never published",
        [send(HELLO), okp(WELCOME), send(WITHDRAW),
         ok(Withdrawn(COMMITTED.image_id, "absent")),
         recv(b"", [ConnectionClosed(True)], eof=True)])
    dest_bad("withdraw-after-start", encode(WITHDRAW), "out-of-state",
             "withdraw is only legal right after welcome, never inside a migration")
    vec("withdraw-before-welcome", "dest", "withdraw before the destination answered hello",
        [okp(HELLO), recv(encode(WITHDRAW), (), "out-of-state")])
    vec("withdrawn-wrong-image", "source", "withdrawn naming another image",
        [send(HELLO), okp(WELCOME), send(WITHDRAW),
         recv(raw({"type": "withdrawn", "image_id": "img-other", "outcome": "absent"}),
              (), "out-of-state")])
    vec("withdrawn-bad-outcome", "source", "withdrawn with an outcome we do not know",
        [send(HELLO), okp(WELCOME), send(WITHDRAW),
         recv(raw({"type": "withdrawn", "image_id": COMMITTED.image_id,
                   "outcome": "maybe"}), (), "malformed")])
    vec("withdrawn-unasked", "source", "withdrawn in the middle of a migration",
        SOURCE_STREAMING + [recv(encode(WITHDRAWN), (), "out-of-state")])
    vec("cancel-crosses-released", "dest",
        "the source gave up (cancel) while released was on its way: legal in "
        "DONE, the destination withdraws the image",
        dst_commit + [send(COMMITTED), ok(RELEASE), send(RELEASED), ok(Cancel("gave up")),
                      recv(b"", [ConnectionClosed(True)], eof=True)])

    # -- three-way commit: release / released ----------------------------------
    vec("eof-after-committed", "dest",
        "the source vanishes after committed, before release: not clean (the "
        "destination removes the prepared image)",
        dst_commit + [send(COMMITTED), recv(b"", [ConnectionClosed(False)], eof=True)])
    vec("eof-after-release", "source",
        "the destination vanishes after release, before released: not clean "
        "(the outcome is in doubt)",
        src_done + [ok(COMMITTED), send(RELEASE),
                    recv(b"", [ConnectionClosed(False)], eof=True)])
    vec("cancel-after-committed", "dest",
        "the source backs out after committed: legal, the prepared image is removed",
        dst_commit + [send(COMMITTED), ok(Cancel("operator asked")),
                      recv(b"", [ConnectionClosed(True)], eof=True)])
    vec("error-while-release-sent", "source",
        "the destination fails to publish: error is legal in RELEASE_SENT",
        src_done + [ok(COMMITTED), send(RELEASE),
                    ok(Error("disk-full", "no space to publish"))])
    vec("release-wrong-image", "dest",
        "release naming another image than committed did",
        dst_commit + [send(COMMITTED),
                      recv(raw({"type": "release", "image_id": "img-other"}), (),
                           "out-of-state")])
    vec("released-wrong-image", "source",
        "released naming another image than committed did",
        src_done + [ok(COMMITTED), send(RELEASE),
                    recv(raw({"type": "released", "image_id": "img-other"}), (),
                         "out-of-state")])
    dest_bad("release-while-streaming", encode(RELEASE), "out-of-state",
             "release before any commit-request")
    dest_bad("release-before-committed", encode(RELEASE), "out-of-state",
             "release while the destination is still preparing (COMMIT_SENT)",
             dst_commit)
    vec("release-twice", "dest", "a second release after released",
        dst_commit + [send(COMMITTED), ok(RELEASE), send(RELEASED),
                      recv(encode(RELEASE), (), "out-of-state")])
    dest_bad("release-from-source-is-not-released", encode(RELEASED), "out-of-state",
             "released is a destination-only message", dst_commit + [send(COMMITTED)])
    vec("source-receives-release", "source", "release is a source-only message",
        src_done + [ok(COMMITTED), recv(encode(RELEASE), (), "out-of-state")])
    vec("source-receives-released-early", "source",
        "released before the source sent release",
        src_done + [ok(COMMITTED), recv(encode(RELEASED), (), "out-of-state")])
    vec("released-before-committed", "source", "released while waiting for committed",
        src_done + [recv(encode(RELEASED), (), "out-of-state")])
    dest_bad("release-image-id-path", raw({"type": "release", "image_id": "../images"}),
             "malformed", "an image id is a token, never a path",
             dst_commit + [send(COMMITTED)])
    dest_bad("release-image-id-65", raw({"type": "release", "image_id": "i" * 65}),
             "too-large", "image id over 64 bytes", dst_commit + [send(COMMITTED)])
    dest_bad("release-missing-id", raw({"type": "release"}), "malformed",
             "release without image_id", dst_commit + [send(COMMITTED)])
    dest_bad("release-extra-field", raw({"type": "release", "image_id": RELEASE.image_id,
                                         "force": True}),
             "malformed", "unknown fields in release", dst_commit + [send(COMMITTED)])
    vec("released-int-id", "source", "released with an integer image id",
        src_done + [ok(COMMITTED), send(RELEASE),
                    recv(raw({"type": "released", "image_id": 7}), (), "malformed")])


def build_backlog() -> None:
    """The destination's writeback backlog (capability "backlog")."""
    src_bl = [send(HELLO_BL), okp(WELCOME_BL), send(START), ok(ACCEPT), send(LAYOUT0),
              send(PAGES0)]
    vec("backlog-source", "source",
        "with the backlog capability the destination reports its writeback "
        "backlog after a round-end; a report may cross freeze, final-end and "
        "commit-request",
        src_bl + [send(ROUNDEND0), ok(Backlog(0, pg(4), 12.5)), send(FREEZE1),
                  ok(Backlog(0, pg(2), 6.0)), send(FinalEnd(1, 4)),
                  send(CommitRequest(4)), ok(Backlog(0, 0, 0.0), COMMITTED),
                  send(RELEASE), ok(RELEASED),
                  recv(b"", [ConnectionClosed(True)], eof=True)])
    vec("backlog-without-capability", "source",
        "backlog when welcome did not accept the capability",
        SOURCE_STREAMING + [send(LAYOUT0), send(PAGES0), send(ROUNDEND0),
                            recv(encode(Backlog(0, pg(4), 12.5)), (), "out-of-state")])
    vec("backlog-before-round-end", "source",
        "backlog naming a round whose round-end the source has not sent",
        src_bl + [recv(encode(Backlog(0, pg(4), 12.5)), (), "out-of-state")])
    bl = lambda **kw: raw({"type": "backlog", "round": 0, "unflushed": 0,  # noqa: E731
                           "flush_ms": 0, **kw})
    for name, frame, code, what in (
            ("backlog-flush-ms-negative", bl(flush_ms=-1.0), "malformed", "negative flush_ms"),
            ("backlog-flush-ms-nan", bl(flush_ms=float("nan")), "malformed", "NaN flush_ms"),
            ("backlog-unflushed-2-63", bl(unflushed=2 ** 63), "malformed",
             "unflushed above 2**63-1"),
            ("backlog-extra-field", bl(rate=1.0), "malformed", "unknown field in backlog")):
        vec(name, "source", what, src_bl + [send(ROUNDEND0), recv(frame, (), code)])
    dest_bad("backlog-from-source", encode(Backlog(0, 0, 0.0)), "out-of-state",
             "only the destination sends backlog",
             [okp(HELLO_BL), send(WELCOME_BL), ok(START), send(ACCEPT), ok(LAYOUT0),
              ok(RoundEnd(0, 0, 0, 1.0, 0.0, 0.0, 0.0))])


def build_final_figures() -> None:
    """The frozen round's figures in final-end (capability "final-figures")."""
    hello = Hello((1,), "node-a.example", ("final-figures",), "mig-0003")
    welcome = Welcome(1, "node-b.example", ("final-figures",))
    frozen = [ok(PAGES0), ok(ROUNDEND0), ok(FREEZE1)]
    with_cap = [okp(hello), send(welcome), ok(START), send(ACCEPT), ok(LAYOUT0)] + frozen
    vec("final-figures-dest", "dest",
        "with the final-figures capability final-end carries the frozen round's "
        "dirty_rate and pause_ms",
        with_cap + [ok(FinalEnd(1, 4, 1234.5, 0.25)), ok(CommitRequest(4))])
    vec("final-figures-without-capability", "dest",
        "final-end with figures when welcome did not accept the capability",
        DEST_STREAMING + frozen + [recv(encode(FinalEnd(1, 4, 1234.5, 0.25)), (), "malformed")])
    fe = lambda **kw: raw({"type": "final-end", "round": 1, "total_pages": 4, **kw})  # noqa: E731
    for name, frame, what in (
            ("final-figures-negative", fe(dirty_rate=-1.0), "negative dirty_rate"),
            ("final-figures-nan", fe(pause_ms=float("nan")), "NaN pause_ms"),
            ("final-figures-str", fe(pause_ms="1"), "pause_ms as a string"),
            ("final-end-extra-field", fe(rate=1.0), "unknown field in final-end")):
        vec(name, "dest", what, with_cap + [recv(frame, (), "malformed")])


def main() -> None:
    build()
    build_backlog()
    build_final_figures()
    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names)), "duplicate vector name"
    out_bin = HERE / "bin"
    shutil.rmtree(out_bin, ignore_errors=True)
    out_bin.mkdir()
    index = {"protocol": 1, "page_size": PAGE, "preamble_hex": P.hex(),
             "format": "see generate.py docstring and SPEC.md section 'Test vectors'",
             "vectors": []}
    for v in VECTORS:
        steps = []
        for k, st in enumerate(v["steps"]):
            if st[0] == "send":
                steps.append({"send": event_to_json(st[1])})
                continue
            _, data, expect, error, eof, canonical = st
            fname = f"bin/{v['name']}.{k}.bin"
            (HERE / fname).write_bytes(data)
            step = {"recv": fname, "eof": eof,
                    "expect": [event_to_json(e) for e in expect], "error": error}
            if canonical:
                step["canonical"] = True
            steps.append(step)
        index["vectors"].append({"name": v["name"], "role": v["role"],
                                 "description": v["description"], "steps": steps})
    (HERE / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    nbin = len(list(out_bin.iterdir()))
    print(f"{len(VECTORS)} vectors, {nbin} binary files written under {HERE}")


if __name__ == "__main__":
    main()
