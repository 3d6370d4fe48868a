#!/usr/bin/env python3
"""Clean-room peers of protocol v1, written from protocol/SPEC.md alone:
stdlib + msgpack, and xxhash for the XXH3-128 the spec names -- nothing
from ``migrated``.  tests/wire/test_cleanroom_peer.py runs them against
real daemons, so a daemon change that a reader of the spec could not
have followed fails there.

    python tests/wire/cleanroom_peer.py source HOST:PORT     # JSON summary
    python tests/wire/cleanroom_peer.py dest HOST:PORT --out FILE
"""
from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time

import msgpack
import xxhash

PREAMBLE = b"MIGRATD\x01"
PAGE = 4096


class PeerError(Exception):
    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def xxh128(data) -> bytes:
    return xxhash.xxh3_128_digest(data)


def pack_runs(runs) -> bytes:
    return b"".join(struct.pack("<QQ", a, n) for a, n in runs)


def unpack_runs(b: bytes):
    return [struct.unpack_from("<QQ", b, i) for i in range(0, len(b), 16)]


def frame(msg: dict) -> bytes:
    assert next(iter(msg)) == "type"
    body = msgpack.packb(msg, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


class Conn:
    """Framed msgpack over one socket: exactly what SPEC sections 3 and 4 say."""

    def __init__(self, sock: socket.socket, *, max_frame: int = 16 * 1024):
        self.sock = sock
        self.buf = bytearray()
        self.max_frame = max_frame
        self.got_preamble = False
        self.sent_bytes = 0
        self.log = []          # (direction, type) for the report

    def send(self, msg: dict, pre: bytes = b"") -> int:
        data = pre + frame(msg)
        self.sock.sendall(data)
        self.sent_bytes += len(data)
        self.log.append(("->", msg["type"]))
        return len(data)

    def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def recv(self):
        """The next message as a dict, or None at end of stream."""
        if not self.got_preamble:
            if not self._fill(8):
                raise PeerError("malformed", f"end of stream in preamble: {bytes(self.buf)!r}")
            if bytes(self.buf[:7]) != PREAMBLE[:7]:
                raise PeerError("malformed", f"bad magic {bytes(self.buf[:8])!r}")
            if self.buf[7] != 1:
                raise PeerError("version", f"framing version {self.buf[7]}")
            del self.buf[:8]
            self.got_preamble = True
        if not self._fill(4):
            if self.buf:
                raise PeerError("malformed", "end of stream inside a length")
            return None
        (length,) = struct.unpack(">I", self.buf[:4])
        if length == 0:
            raise PeerError("malformed", "zero length")
        if length > self.max_frame:
            raise PeerError("too-large", f"frame of {length} bytes")
        if not self._fill(4 + length):
            raise PeerError("malformed", "end of stream inside a frame")
        body = bytes(self.buf[4:4 + length])
        del self.buf[:4 + length]
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
        if not isinstance(msg, dict) or next(iter(msg), None) != "type":
            raise PeerError("malformed", f"body is not a map starting with type: {msg!r}")
        self.log.append(("<-", msg["type"]))
        return msg


def expect(conn: Conn, *types, skip=("keepalive", "backlog")):
    """Next message of one of `types`, passing over keepalive/backlog; errors raise."""
    seen = []
    while True:
        m = conn.recv()
        if m is None:
            raise PeerError("eof", f"end of stream while waiting for {types}; skipped {seen}")
        t = m["type"]
        if t == "error":
            raise PeerError(m.get("code"), m.get("message"))
        if t in types:
            return m, seen
        if t in skip:
            seen.append(m)
            continue
        raise PeerError("out-of-state", f"got {t} while waiting for {types}")


# -- layout -----------------------------------------------------------------

KIND = {"anon": 0, "file": 1, "shared-anon": 2, "shared-file": 3, "vdso": 4, "skip": 5}
FLAG = {"deleted": 1, "heap": 2, "stack": 4}


def perms_byte(p: str) -> int:
    return ((p[0] == "r") | (p[1] == "w") << 1 | (p[2] == "x") << 2 | (p[3] == "s") << 3)


def layout_msg(rnd: int, maps) -> dict:
    starts, ends, offs, perms, kinds, flags, pends, paths = [], [], [], [], [], [], [], b""
    for m in maps:
        starts.append(m["start"])
        ends.append(m["end"])
        offs.append(m.get("offset", 0))
        perms.append(perms_byte(m["perms"]))
        kinds.append(KIND[m["kind"]])
        f = 0
        for name in m.get("flags", ()):
            f |= FLAG[name]
        flags.append(f)
        paths += m.get("path", b"")
        pends.append(len(paths))
    n = len(maps)
    return {
        "type": "layout",
        "round": rnd,
        "starts": struct.pack(f"<{n}Q", *starts),
        "ends": struct.pack(f"<{n}Q", *ends),
        "offsets": struct.pack(f"<{n}Q", *offs),
        "perms": bytes(perms),
        "kinds": bytes(kinds),
        "flags": bytes(flags),
        "path_ends": struct.pack(f"<{n}I", *pends),
        "paths": paths,
    }


def page_bytes(addr: int, rnd: int) -> bytes:
    head = f"cleanroom round={rnd} addr={addr:#x};".encode()
    return (head * (PAGE // len(head) + 1))[:PAGE]


def pages_to_runs(addrs):
    runs = []
    for a in sorted(addrs):
        if runs and runs[-1][0] + runs[-1][1] * PAGE == a:
            runs[-1][1] += 1
        else:
            runs.append([a, 1])
    return [tuple(r) for r in runs]


# -- the fake process ---------------------------------------------------------

HEAP = 0x10000000
LIB = 0x10010000
SHM = 0x20000000
STACK = 0x7FFD00000000
EXTRA = 0x30000000
VSYSCALL = 0xFFFFFFFFFF600000

MAPS0 = [
    dict(start=HEAP, end=HEAP + 16 * PAGE, perms="rw-p", kind="anon", flags=["heap"], path=b"[heap]"),
    dict(start=LIB, end=LIB + 4 * PAGE, perms="r-xp", kind="file", offset=0x2000, path=b"/opt/cleanroom/libfake.so"),
    dict(start=SHM, end=SHM + 2 * PAGE, perms="rw-s", kind="shared-file", path=b"/dev/shm/cleanroom-ring"),
    dict(start=STACK, end=STACK + 8 * PAGE, perms="rw-p", kind="anon", flags=["stack"], path=b"[stack]"),
    dict(start=VSYSCALL, end=VSYSCALL + PAGE, perms="--xp", kind="skip", path=b"[vsyscall]"),
]
# round 2 (frozen): a new anonymous mapping appears
MAPS2 = MAPS0[:3] + [dict(start=EXTRA, end=EXTRA + 4 * PAGE, perms="rw-p", kind="anon")] + MAPS0[3:]
MAPS2.sort(key=lambda m: m["start"])


def P(base, *idx):
    return [base + i * PAGE for i in idx]


class Source:
    def __init__(self, addr, caps, mig_id, then_release=True):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=20)
        self.conn = Conn(self.sock)
        self.caps = caps
        self.mig_id = mig_id
        self.image = {}        # addr -> bytes (expected final data pages)
        self.zero = set()      # expected zero pages
        self.round = 0
        self.total_pages = 0
        self.round_pages = 0
        self.round_bytes0 = 0
        self.then_release = then_release
        self.notes = []

    def handshake(self):
        c = self.conn
        c.send({"type": "hello", "versions": [1], "node": "cleanroom-src",
                "capabilities": self.caps, "migration_id": self.mig_id}, pre=PREAMBLE)
        w, _ = expect(c, "welcome")
        self.welcome = w
        c.send({"type": "start", "pid": 4242, "cmdline": b"/opt/cleanroom/app\0--fake\0",
                "exe": b"/opt/cleanroom/app", "page_size": PAGE, "tracker": "digest",
                "estimated_bytes": 64 * PAGE, "options": {"downtime_ms": 300}})
        a, _ = expect(c, "accept")
        self.accept = a
        self.max_batch = a["max_batch_pages"]

    def send_pages(self, addrs):
        addrs = sorted(addrs)
        for i in range(0, len(addrs), self.max_batch):
            chunk = addrs[i:i + self.max_batch]
            data = b"".join(page_bytes(a, self.round) for a in chunk)
            self.conn.send({"type": "pages", "round": self.round,
                            "runs": pack_runs(pages_to_runs(chunk)),
                            "digest": xxh128(data), "data": data})
            for a in chunk:
                self.image[a] = page_bytes(a, self.round)
                self.zero.discard(a)
            self.round_pages += len(chunk)
            self.total_pages += len(chunk)

    def send_zeros(self, addrs):
        self.conn.send({"type": "zeros", "round": self.round, "runs": pack_runs(pages_to_runs(addrs))})
        for a in addrs:
            self.image.pop(a, None)
            self.zero.add(a)

    def send_dropped(self, addrs):
        self.conn.send({"type": "dropped", "round": self.round, "runs": pack_runs(pages_to_runs(addrs))})
        for a in addrs:
            self.image.pop(a, None)
            self.zero.discard(a)

    def layout(self, maps):
        self.conn.send(layout_msg(self.round, maps))
        self.maps = maps

    def round_end(self):
        t0 = time.monotonic()
        self.conn.send({"type": "round-end", "round": self.round, "pages": self.round_pages,
                        "bytes": self.conn.sent_bytes - self.round_bytes0, "duration_ms": 1,
                        "dirty_rate": 0, "bandwidth": 1.5e6, "pause_ms": 0})
        self.round += 1
        self.round_pages = 0
        self.round_bytes0 = self.conn.sent_bytes

    def run(self):
        self.handshake()
        # round 0
        self.layout(MAPS0)
        self.send_pages(P(HEAP, 0, 1, 2, 3, 8, 9) + P(LIB, 0, 1) + P(STACK, 6, 7))
        self.send_zeros(P(HEAP, 4, 5, 6, 7) + P(STACK, 5))
        self.round_end()
        # round 1: a few pages change, some go away
        self.send_pages(P(HEAP, 1, 8) + P(STACK, 6))
        self.send_dropped(P(HEAP, 9, 7))
        self.round_end()
        # freeze in round 2, layout change + final delta
        self.conn.send({"type": "freeze", "round": self.round})
        self.layout(MAPS2)
        self.send_pages(P(HEAP, 2) + P(EXTRA, 0, 1, 2))
        self.conn.send({"type": "final-end", "round": self.round, "total_pages": self.total_pages})
        n = len(self.image) + len(self.zero)
        self.conn.send({"type": "commit-request", "pages": n})
        self.conn.sock.settimeout(130)
        committed, skipped = expect(self.conn, "committed")
        self.skipped = skipped
        out = {"image_id": committed["image_id"], "digest": committed["digest"],
               "welcome": self.welcome, "accept": self.accept,
               "skipped_before_committed": [s["type"] for s in skipped]}
        if self.then_release:
            self.conn.send({"type": "release", "image_id": committed["image_id"]})
            released, _ = expect(self.conn, "released")
            assert released["image_id"] == committed["image_id"], released
            self.sock.shutdown(socket.SHUT_WR)
            tail = []
            while True:
                m = self.conn.recv()
                if m is None:
                    break
                tail.append(m["type"])
            out["after_released"] = tail
        out["expected"] = {
            "data": {hex(a): xxh128(b).hex() for a, b in sorted(self.image.items())},
            "zero": sorted(hex(a) for a in self.zero),
            "data_runs": [[hex(a), n] for a, n in pages_to_runs(self.image)],
            "zero_runs": [[hex(a), n] for a, n in pages_to_runs(self.zero)],
            "total_pages": self.total_pages,
        }
        out["log"] = self.conn.log
        return out


class Dest:
    """One incoming migration, from SPEC sections 5-10; keeps the image in memory."""

    LIMIT_BY_STATE = {"hello": 16 * 1024, "start": 256 * 1024, "stream": 9 * 1024 * 1024}

    def __init__(self, sock, node="cleanroom-dst", echo_caps=("zeros",), max_batch=256):
        self.sock = sock
        self.conn = Conn(sock)
        self.node = node
        self.echo = echo_caps
        self.max_batch = max_batch
        self.data = {}
        self.zero = set()
        self.maps = None
        self.round = 0
        self.round_pages = 0
        self.total_pages = 0
        self.rounds = []

    def fail(self, code, msg):
        try:
            self.conn.send({"type": "error", "code": code, "message": msg})
        finally:
            raise PeerError(code, msg)

    def next(self, *types):
        while True:
            m = self.conn.recv()
            if m is None:
                raise PeerError("eof", f"end of stream while waiting for {types}")
            if m["type"] == "keepalive":
                continue
            if m["type"] in ("error", "cancel"):
                raise PeerError(m.get("code", "cancelled"), m.get("message", m.get("reason")))
            if m["type"] not in types:
                self.fail("out-of-state", f"{m['type']} while expecting {types}")
            return m

    def regions(self):
        out = []
        for st, en, kind in self.maps:
            if kind in (0, 1, 2, 4):
                if out and out[-1][1] == st:
                    out[-1][1] = en
                else:
                    out.append([st, en])
        return out

    def inside(self, runs):
        regs = self.regions()
        for a, n in runs:
            e = a + n * PAGE
            if not any(s0 <= a and e <= e0 for s0, e0 in regs):
                self.fail("bad-pages", f"run {a:#x}+{n} outside the migratable mappings")

    def set_layout(self, m):
        n = len(m["starts"]) // 8
        st = struct.unpack(f"<{n}Q", m["starts"])
        en = struct.unpack(f"<{n}Q", m["ends"])
        self.maps = list(zip(st, en, m["kinds"]))
        self.layout_msg = m
        regs = self.regions()
        keep = lambda a: any(s0 <= a < e0 for s0, e0 in regs)
        self.data = {a: d for a, d in self.data.items() if keep(a)}
        self.zero = {a for a in self.zero if keep(a)}

    def stream_msg(self, m):
        t = m["type"]
        if m["round"] != self.round:
            self.fail("out-of-state", f"{t} of round {m['round']} in round {self.round}")
        if t == "layout":
            return self.set_layout(m)
        if self.maps is None:
            self.fail("out-of-state", f"{t} before any layout")
        if t == "round-end":
            if m["pages"] != self.round_pages:
                self.fail("bad-pages", f"round {self.round}: {m['pages']} pages said, {self.round_pages} came")
            self.rounds.append({k: v for k, v in m.items() if k != "type"})
            self.round += 1
            self.round_pages = 0
            return
        runs = unpack_runs(m["runs"])
        self.inside(runs)
        addrs = [a + i * PAGE for a, n in runs for i in range(n)]
        if t == "pages":
            d = m["data"]
            if len(d) != len(addrs) * PAGE:
                self.fail("malformed", "data length does not match runs")
            if xxh128(d) != m["digest"]:
                self.fail("digest", "batch digest mismatch")
            for i, a in enumerate(addrs):
                self.data[a] = d[i * PAGE:(i + 1) * PAGE]
                self.zero.discard(a)
            self.round_pages += len(addrs)
            self.total_pages += len(addrs)
        elif t == "zeros":
            for a in addrs:
                self.data.pop(a, None)
                self.zero.add(a)
        elif t == "dropped":
            for a in addrs:
                self.data.pop(a, None)
                self.zero.discard(a)

    def run(self):
        c = self.conn
        c.max_frame = self.LIMIT_BY_STATE["hello"]
        h = self.next("hello")
        if 1 not in h["versions"]:
            c.send({"type": "error", "code": "version", "message": "only version 1"}, pre=PREAMBLE)
            raise PeerError("version", str(h["versions"]))
        caps = [x for x in h["capabilities"] if x in self.echo]
        c.send({"type": "welcome", "version": 1, "node": self.node, "capabilities": caps}, pre=PREAMBLE)
        self.hello = h
        c.max_frame = self.LIMIT_BY_STATE["start"]
        st = self.next("start")
        self.start = st
        if st["page_size"] != PAGE:
            self.fail("unsupported", f"page size {st['page_size']}")
        c.send({"type": "accept", "max_batch_pages": self.max_batch, "quota_bytes": 1 << 40})
        if getattr(self, "keepalive_first", False):
            c.send({"type": "keepalive", "seq": 2**64 - 1})
        c.max_frame = self.LIMIT_BY_STATE["stream"]
        while True:
            m = self.next("layout", "pages", "zeros", "dropped", "round-end", "freeze")
            if m["type"] == "freeze":
                if m["round"] != self.round:
                    self.fail("out-of-state", "freeze of another round")
                break
            self.stream_msg(m)
        while True:
            m = self.next("layout", "pages", "zeros", "dropped", "final-end")
            if m["type"] == "final-end":
                if m["round"] != self.round or m["total_pages"] != self.total_pages:
                    self.fail("bad-pages", f"final-end {m} but {self.total_pages} pages came")
                break
            self.stream_msg(m)
        cr = self.next("commit-request")
        held = len(self.data) + len(self.zero)
        if cr["pages"] != held:
            self.fail("bad-pages", f"commit-request says {cr['pages']} pages, image holds {held}")
        image_id = "cleanroom-" + time.strftime("%Y%m%d%H%M%S")
        dig = xxhash.xxh3_128_hexdigest(b"".join(self.data[a] for a in sorted(self.data)))
        c.send({"type": "committed", "image_id": image_id, "digest": dig})
        rel = self.next("release")
        if rel["image_id"] != image_id:
            self.fail("out-of-state", "release names another image")
        c.send({"type": "released", "image_id": image_id})
        verdict = self.conn.recv()   # end of stream = success
        return {"image_id": image_id, "digest": dig, "verdict": verdict and verdict["type"],
                "hello": self.hello, "start": {k: (v.decode(errors="replace") if isinstance(v, bytes) else v) for k, v in self.start.items()},
                "rounds": self.rounds, "data_pages": len(self.data), "zero_pages": len(self.zero),
                "total_pages": self.total_pages, "maps": len(self.maps),
                "pages_sha": {hex(a): xxh128(d).hex() for a, d in sorted(self.data.items())},
                "log_types": sorted(set(t for _, t in self.conn.log))}


def serve(ls: socket.socket, *, max_batch=256, keepalive_first=False) -> dict:
    """Take one connection on the listening socket ``ls`` and serve it."""
    s, peer = ls.accept()
    s.settimeout(120)
    d = Dest(s, max_batch=max_batch)
    d.keepalive_first = keepalive_first
    try:
        res = d.run()
    except PeerError as e:
        res = {"error": e.code, "message": e.message, "log": d.conn.log[-10:]}
    finally:
        s.close()
    res["peer"] = list(peer)
    return res


def serve_one(addr, out_path, **kw):
    host, port = addr.rsplit(":", 1)
    with socket.create_server((host, int(port))) as ls:
        res = serve(ls, **kw)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1, default=lambda o: o.hex() if isinstance(o, bytes) else str(o))

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["source", "dest"])
    ap.add_argument("addr")
    ap.add_argument("--caps", default="zeros")
    ap.add_argument("--id", default="cleanroom-1")
    ap.add_argument("--no-release", action="store_true")
    ap.add_argument("--out", default="dest.json")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--keepalive", action="store_true")
    a = ap.parse_args()
    if a.role == "dest":
        serve_one(a.addr, a.out, max_batch=a.max_batch, keepalive_first=a.keepalive)
        return 0
    caps = [c for c in a.caps.split(",") if c]
    src = Source(a.addr, caps, a.id, then_release=not a.no_release)
    try:
        out = src.run()
    except PeerError as e:
        print(json.dumps({"error": e.code, "message": e.message, "log": src.conn.log}, indent=1))
        return 1
    print(json.dumps(out, indent=1, default=lambda o: o.hex() if isinstance(o, bytes) else str(o)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
