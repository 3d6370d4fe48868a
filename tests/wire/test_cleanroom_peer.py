"""SPEC.md is enough to write a compatible peer (issue 3): a source and a
destination written from it alone (tests/wire/cleanroom_peer.py, no
``migrated`` import) against real daemons over plain TCP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading

import xxhash

from tests.cluster import PY, ROOT, Cluster
from tests.faults.victim import Victim

from . import cleanroom_peer as cr

CHUNK = 2 << 20


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "migrated.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_a_cleanroom_source_gets_exactly_its_pages_into_the_image():
    with Cluster(tls=False) as c:
        dst = c.daemon("dst")
        out = cr.Source(f"{dst.host}:{dst.port}", ["zeros", "backlog"], "cleanroom-1").run()
        iid = out["image_id"]
        v = _cli("images", "verify", iid, "--state-dir", dst.state_dir)
        assert v.returncode == 0, v.stdout + v.stderr
        r = _cli("images", "show", iid, "--json", "--state-dir", dst.state_dir)
        assert r.returncode == 0, r.stderr
        man = json.loads(r.stdout)
        assert man["digest"] == out["digest"]
        assert man["meta"]["migration_id"] == "cleanroom-1"
        assert man["meta"]["cmdline"] == ["/opt/cleanroom/app", "--fake"]
        exp = out["expected"]
        assert [run for m in man["mappings"] for run in m.get("data", [])] == exp["data_runs"]
        assert [run for m in man["mappings"] for run in m.get("zero", [])] == exp["zero_runs"]
        assert [(m["kind"], m["path"], m["flags"]) for m in man["mappings"]] == [
            ("anon", "[heap]", ["heap"]), ("file", "/opt/cleanroom/libfake.so", []),
            ("shared-file", "/dev/shm/cleanroom-ring", []), ("anon", "", []),
            ("anon", "[stack]", ["stack"]), ("skip", "[vsyscall]", [])]
        slots = {int(ch["vaddr"], 16): ch["slot"] for ch in man["chunks"]}
        with open(os.path.join(dst.state_dir, "images", iid, "pages.img"), "rb") as f:
            img = f.read()
        for a_hex, want in exp["data"].items():
            a = int(a_hex, 16)
            off = slots[a & ~(CHUNK - 1)] * CHUNK + (a & (CHUNK - 1))
            assert xxhash.xxh3_128_digest(img[off:off + cr.PAGE]).hex() == want, a_hex
        assert dst.partials() == []


def test_a_real_source_migrates_into_a_cleanroom_destination():
    with Cluster(tls=False) as c, Victim(mib=4, rate=200.0) as victim:
        src = c.daemon("src")
        with socket.create_server(("127.0.0.1", 0)) as ls:
            port = ls.getsockname()[1]
            got: dict = {}
            t = threading.Thread(target=lambda: got.update(cr.serve(ls, max_batch=7,
                                                                    keepalive_first=True)))
            t.start()
            mid = src.send(victim.pid, "127.0.0.1", port, then="resume")
            st = src.wait_done(mid, 90)
            t.join(30)
        assert st["state"] == "completed", st
        assert "error" not in got, got
        assert got["verdict"] is None                      # a clean close after released
        assert st["summary"]["image_id"] == got["image_id"]
        assert st["summary"]["digest"] == got["digest"]
        assert got["hello"]["migration_id"] == mid
        assert got["data_pages"] >= (4 << 20) // cr.PAGE
