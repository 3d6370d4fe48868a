"""Inside the lab VM (a kernel with CONFIG_MEM_SOFT_DIRTY): the probe must
find soft-dirty and pick it.  Run by tests/lab/run.py; skipped on the host.
The soft-dirty tracker itself is tested by the `lab` variants of
tests/kernel/test_trackers.py in the same boot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from migrated.kernel import probe as kprobe

pytestmark = pytest.mark.lab

MIGRATECTL = os.path.join(os.path.dirname(sys.executable), "migratectl")


def test_probe_finds_soft_dirty():
    r = kprobe.probe()
    assert r["soft_dirty"] is True, r["soft_dirty_reason"]
    assert r["tracker"] == "soft-dirty"
    assert r["trackers_available"] == ["soft-dirty", "digest"]
    assert r["pagemap"] == "full"
    assert r["process_vm_readv"] is True


def test_migratectl_probe_json_picks_soft_dirty():
    p = subprocess.run([MIGRATECTL, "probe", "--json"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["soft_dirty"] is True
    assert out["tracker"] == "soft-dirty"
    assert out["kernel"] == os.uname().release


def test_forced_trackers_accepted():
    r = kprobe.probe()
    assert kprobe.select_tracker("soft-dirty", r) == "soft-dirty"
    assert kprobe.select_tracker("digest", r) == "digest"
