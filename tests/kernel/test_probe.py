"""The kernel probe and `migratectl probe`, checked against independent
evidence: a soft-dirty test on a *child* through the pagemap module, the
kernel version for PAGEMAP_SCAN, and the tracker choice that follows."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from migrated.errors import KernelUnsupported, MigratedError
from migrated.kernel import probe as kprobe
from migrated.kernel.pagemap import Pagemap, clear_soft_dirty, is_soft_dirty

REQUIRED_KEYS = {"kernel", "soft_dirty", "pagemap_scan", "uffd_wp_async", "tracker",
                 "arch", "page_size", "pagemap_scan_categories", "process_vm_readv",
                 "uid", "pagemap", "pagemap_pfn", "trackers_available"}
MIGRATECTL = os.path.join(os.path.dirname(sys.executable), "migratectl")


def kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return int(m.group(1)), int(m.group(2))


def child_has_soft_dirty(target) -> bool:
    """Independent of probe.py: a child writes, we clear its refs and read
    its pagemap words through the pagemap module."""
    target.map("sd", 4, guard=True)
    ok = True
    with Pagemap(target.pid) as pm:
        for seed in (1, 2):
            target.write("sd", 0, 4, seed=seed)
            clear_soft_dirty(target.pid)
            ok &= not is_soft_dirty(pm.read(*target.range("sd"))).any()
            target.write("sd", 0, 4, seed=seed + 10)
            ok &= bool(is_soft_dirty(pm.read(*target.range("sd"))).all())
    return ok


@pytest.fixture(scope="module")
def result():
    return kprobe.probe()


def test_keys_and_types(result):
    assert REQUIRED_KEYS <= set(result)
    assert result["kernel"] == os.uname().release
    assert result["page_size"] == os.sysconf("SC_PAGE_SIZE")
    assert result["uid"] == os.geteuid()
    for k in ("soft_dirty", "pagemap_scan", "uffd_wp_async", "process_vm_readv"):
        assert isinstance(result[k], bool), k
    json.dumps(result)   # must be JSON-serialisable as is


def test_soft_dirty_matches_a_child(result, target):
    assert result["soft_dirty"] == child_has_soft_dirty(target)


def test_pagemap_scan_follows_kernel_version(result):
    v = kernel_version()
    assert result["pagemap_scan"] == (v >= (6, 7))
    cats = result["pagemap_scan_categories"]
    if result["pagemap_scan"]:
        assert {"written", "present", "swapped", "pfnzero", "huge", "file"} <= set(cats)
        assert ("soft_dirty" in cats) == (v >= (6, 8))
    else:
        assert cats == []


def test_tracker_choice_follows_soft_dirty(result):
    if result["uffd_wp_tracker"]:
        want = "uffd-wp"
    else:
        want = "soft-dirty" if result["soft_dirty"] else "digest"
    assert (result["soft_dirty"]) == ("soft-dirty" in result["trackers_available"])
    assert result["tracker"] == want
    assert result["trackers_available"][0] == want
    assert "digest" in result["trackers_available"]


def test_root_sees_everything(result):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    assert result["pagemap"] == "full" and result["pagemap_pfn"]
    assert result["process_vm_readv"]


def test_uffd_wp_async_reason_is_consistent(result):
    assert result["uffd_wp_async_reason"]
    if kernel_version() < (6, 7):
        assert result["uffd_wp_async"] is False   # WP_ASYNC is 6.7+


def test_select_tracker():
    with_sd = {"kernel": "x", "soft_dirty": True, "pagemap": "full",
               "trackers_available": ["soft-dirty", "digest"]}
    without = {"kernel": "6.18-test", "soft_dirty": False, "pagemap": "full",
               "soft_dirty_reason": "a write did not set bit 55",
               "trackers_available": ["digest"], "uffd_wp_async": True}
    assert kprobe.select_tracker("auto", with_sd) == "soft-dirty"
    assert kprobe.select_tracker("auto", without) == "digest"
    assert kprobe.select_tracker("DIGEST", with_sd) == "digest"
    assert kprobe.select_tracker("soft-dirty", with_sd) == "soft-dirty"
    with pytest.raises(KernelUnsupported, match=r"soft-dirty is not supported on kernel "
                                                r"6\.18-test: a write did not set bit 55"):
        kprobe.select_tracker("soft-dirty", without)
    with pytest.raises(KernelUnsupported, match=r"uffd-wp is not supported on kernel 6\.18-test"):
        kprobe.select_tracker("uffd-wp", without)
    with_uffd = dict(without, trackers_available=["uffd-wp", "digest"], uffd_wp_tracker=True)
    assert kprobe.select_tracker("auto", with_uffd) == "uffd-wp"
    assert kprobe.select_tracker("uffd-wp", with_uffd) == "uffd-wp"
    with pytest.raises(MigratedError, match="unknown tracker"):
        kprobe.select_tracker("fast", without)


def test_cached_probe_returns_copies():
    a = kprobe.cached_probe()
    a["tracker"] = "mangled"
    assert kprobe.cached_probe()["tracker"] != "mangled"


def run_migratectl(*args) -> subprocess.CompletedProcess:
    return subprocess.run([MIGRATECTL, *args], capture_output=True, text=True, timeout=120)


def test_cli_json_matches_probe(result):
    p = run_migratectl("probe", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert REQUIRED_KEYS <= set(out)
    for k in ("kernel", "soft_dirty", "pagemap_scan", "uffd_wp_async", "tracker",
              "pagemap_scan_categories", "process_vm_readv"):
        assert out[k] == result[k], k


def test_cli_table(result):
    p = run_migratectl("probe")
    assert p.returncode == 0, p.stderr
    assert result["kernel"] in p.stdout
    assert re.search(rf"tracker \(auto\)\s+{re.escape(result['tracker'])}$", p.stdout, re.M)
    assert re.search(r"^soft-dirty\s+(yes|no):", p.stdout, re.M)
