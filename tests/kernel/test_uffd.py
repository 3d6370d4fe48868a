"""uffd-wp tracker and syscall injection on real child processes.

Needs x86_64, Linux 6.7+ with async uffd write-protect and ptrace rights
(the development machines); skipped elsewhere with the probe's reason.
Regions are guarded and < 2 MiB (no VMA merging, no THP): dirty sets are
exact.  MiniEngine (from test_trackers) mirrors what was sent and checks,
after the final frozen collect, mirror == memory page for page.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from migrated.errors import NoSuchProcess
from migrated.kernel import pagemap as pm
from migrated.kernel.freezer import Freezer
from migrated.kernel.maps import Layout, Mapping, read_layout
from migrated.kernel.ptrace_inject import (SYS_GETPID, InjectionError, Injector,
                                           find_syscall_insn, tracer_pid)
from migrated.kernel.uffd import (UffdWp, UffdWpTracker, uffd_wp_target_problem,
                                  uffd_wp_tracker_available)
from migrated.runs import PAGE_SIZE, PageRuns
from tests.kernel.test_trackers import MiniEngine, final_round, pages, region

P = PAGE_SIZE

_OK, _WHY = uffd_wp_tracker_available()


@pytest.fixture(autouse=True)
def _needs_uffd_wp(request):
    # test_probe_helper runs everywhere: it fails if the kernel offers
    # everything and the self-test still says no (a broken probe must not
    # silently skip this whole file).
    if not _OK and request.node.name != "test_probe_helper":
        pytest.skip(f"uffd-wp unavailable: {_WHY}")


def released(pid: int) -> None:
    """The target is neither traced nor stopped."""
    assert tracer_pid(pid) == 0
    with open(f"/proc/{pid}/status") as f:
        state = [ln for ln in f if ln.startswith("State:")][0].split()[1]
    assert state in ("S", "R"), f"target left in state {state}"


def fd_table(pid: int) -> dict[str, str]:
    d = f"/proc/{pid}/fd"
    return {n: os.readlink(f"{d}/{n}") for n in os.listdir(d)}


@pytest.fixture
def setup(target):
    fz = Freezer(target.pid)
    tr = UffdWpTracker(target.pid, fz)
    eng = MiniEngine(tr, target.pid)
    try:
        yield target, fz, tr, eng
    finally:
        tr.close()
        fz.close()
        if target.proc.poll() is None:
            released(target.pid)


# -- injection ---------------------------------------------------------------------


def test_inject_getpid_and_failing_call(target):
    with Injector(target.pid) as inj:
        assert tracer_pid(target.pid) == os.getpid()
        assert inj.call(SYS_GETPID) == target.pid
        assert inj.call(9999) == -38          # ENOSYS: reported, not raised
        with pytest.raises(InjectionError, match="Function not implemented"):
            inj.call_ok(9999)
        assert inj.call(SYS_GETPID) == target.pid   # still usable
    released(target.pid)
    target.map("a", 4)
    target.write("a")
    assert target.sha("a")


def test_target_blocked_in_read_keeps_working(target):
    """Target sits in read(stdin) between commands: the interrupted read
    must restart (not fail with EINTR) and every later command work."""
    target.map("a", 8, guard=True)
    for _ in range(3):
        with Injector(target.pid) as inj:
            assert inj.call(SYS_GETPID) == target.pid
        released(target.pid)
    for seed in range(1, 6):
        target.write("a", 0, 8, seed=seed)
        assert target.sha("a") == __import__("hashlib").sha256(
            target.expected("a", 0, 8, seed)).hexdigest()
    assert target.tids()


SLEEPER = r"""
import ctypes, sys, time
libc = ctypes.CDLL(None)
print("ready", flush=True)
t0 = time.monotonic()
left = libc.sleep(1)            # nanosleep, relative: ERESTART_RESTARTBLOCK
print(f"{time.monotonic() - t0:.3f} {left}", flush=True)
"""


def test_target_blocked_in_nanosleep_restarts():
    """A relative nanosleep interrupted by the injection resumes with the
    time left (restart_syscall): it neither ends early nor fails."""
    p = subprocess.Popen([sys.executable, "-c", SLEEPER], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        with Injector(p.pid) as inj:
            assert inj.call(SYS_GETPID) == p.pid
        released(p.pid)
        elapsed, left = p.stdout.readline().split()
        assert int(left) == 0, "sleep() was cut short (EINTR)"
        assert float(elapsed) >= 0.99
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)


ECHO = r"""
import sys
print("ready", flush=True)
for line in sys.stdin:          # blocked in read(2) between lines
    print("echo " + line.strip(), flush=True)
"""


def _sig_blocked(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return [ln for ln in f if ln.startswith("SigBlk:")][0].split()[1]


@pytest.mark.parametrize("dies", ["attached", "between calls"])
def test_tracer_killed_mid_injection_leaves_target_intact(dies):
    """The daemon SIGKILLed (OOM, systemd) while it holds the target for
    the injection: the kernel detaches the target, which runs on from where
    it was stopped.  Between two calls (uffd-wp setup copies the fd out
    there) it was in the single-step trap with the injected registers and
    the trap's SIGTRAP: killed by SIGTRAP, 3 of 3.  Right after the attach
    every signal stayed blocked for good.  It must carry on untouched: its
    read restarted, its mask its own."""
    p = subprocess.Popen([sys.executable, "-c", ECHO], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.2)                 # in read(2) now
        mask = _sig_blocked(p.pid)
        tracer = os.fork()
        if tracer == 0:                 # a tracer that dies like a killed daemon
            try:
                with Injector(p.pid) as inj:
                    if dies == "between calls":
                        inj.call(SYS_GETPID)
                    os.kill(os.getpid(), signal.SIGKILL)
            finally:
                os._exit(3)
        _, status = os.waitpid(tracer, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        time.sleep(0.2)
        assert p.poll() is None, f"target died with status {p.returncode} when its tracer did"
        released(p.pid)
        assert _sig_blocked(p.pid) == mask, "the target's signal mask was left changed"
        p.stdin.write("x\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "echo x"
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def test_bad_syscall_address_restores_target(target):
    """A fault at the injected rip (no `syscall` there) is suppressed, the
    target restored and released, and it carries on."""
    target.map("a", 4, guard=True)
    bogus = target.addr("a")          # rw-, not executable: SIGSEGV on fetch
    with pytest.raises(InjectionError, match="SIGSEGV"):
        with Injector(target.pid, syscall_addr=bogus) as inj:
            inj.call(SYS_GETPID)
    released(target.pid)
    target.write("a", 0, 4, seed=3)
    assert target.sha("a")


def test_syscall_insn_in_vdso(target):
    addr = find_syscall_insn(target.pid)
    vdso = [m for m in read_layout(target.pid) if m.path == "[vdso]"]
    if vdso:
        assert vdso[0].start <= addr < vdso[0].end
    with open(f"/proc/{target.pid}/mem", "rb") as f:
        f.seek(addr)
        assert f.read(2) == b"\x0f\x05"


def test_fd_table_unchanged_by_setup(target):
    before = fd_table(target.pid)
    with UffdWpTracker(target.pid) as tr:
        tr.start(read_layout(target.pid))
        assert fd_table(target.pid) == before
        assert tr._uffd.fd >= 0
        assert "userfaultfd" in os.readlink(f"/proc/self/fd/{tr._uffd.fd}")
    released(target.pid)
    assert fd_table(target.pid) == before


def test_register_failure_leaves_target_released(target):
    """Setup that fails after the injection (a bogus range to register)
    raises, and the target is neither stopped nor traced."""
    target.map("a", 4, guard=True)
    u = UffdWp.create(target.pid)
    try:
        released(target.pid)
        with pytest.raises(OSError, match="UFFDIO_REGISTER"):
            u.register(0x1000, 0x3000)        # nothing mapped there
    finally:
        u.close()
    released(target.pid)
    target.write("a")


def test_bogus_mapping_in_layout_is_skipped(target):
    target.map("a", 16, guard=True)
    target.write("a")
    lay = read_layout(target.pid)
    bogus = Mapping(0x10000, 0x20000, "rw-p", 0, "00:00", 0, "")
    with UffdWpTracker(target.pid) as tr:
        c = tr.start(Layout(list(lay) + [bogus]))
        assert (0x10000, 0x20000) in tr.skipped
        assert c.dirty.contains(pages(target, "a", (0, 16)))
        assert not c.dirty.clip(0x10000, 0x20000)
    released(target.pid)


def test_setup_on_frozen_target_keeps_it_frozen(target):
    target.map("a", 8, guard=True)
    target.write("a")
    with Freezer(target.pid) as fz:
        fz.freeze()
        with UffdWpTracker(target.pid, fz) as tr:
            c = tr.start(read_layout(target.pid))
            assert fz.verify_frozen(), "injection must not end the freeze"
            assert tracer_pid(target.pid) == 0
            fz.thaw()
            tr.sent(c.dirty)
            target.write("a", 2, 1, seed=4)
            c = tr.collect(read_layout(target.pid))
            assert c.dirty.clip(*region(target, "a")) == pages(target, "a", (2, 1))
    released(target.pid)


def test_injection_into_multithreaded_target(target):
    target.threads(3)
    target.map("a", 32, guard=True)
    target.write("a")
    with UffdWpTracker(target.pid) as tr:
        eng = MiniEngine(tr, target.pid)
        eng.start()
        target.write("a", 5, 3, seed=7)
        c = eng.round()
        assert c.dirty.clip(*region(target, "a")) == pages(target, "a", (5, 3))
    released(target.pid)


# -- tracking ------------------------------------------------------------------------


def test_start_reports_everything_present(setup):
    t, fz, tr, eng = setup
    t.map("a", 64, guard=True)
    t.write("a", 0, 10)
    t.write("a", 40, 5)
    c = eng.start()
    assert tr.name == "uffd-wp" and c.pause_ms == 0.0
    assert c.dirty.clip(*region(t, "a")) == pages(t, "a", (0, 10), (40, 5))
    final_round(fz, eng)


def test_exact_dirty_sets(setup):
    t, fz, tr, eng = setup
    t.map("a", 200, guard=True)
    t.write("a", 0, 200, seed=1)
    eng.start()
    a = region(t, "a")
    assert not eng.round().dirty.clip(*a)
    t.write("a", 3, 1, seed=2)
    t.write("a", 7, 1, seed=2)
    t.write("a", 100, 51, seed=2)
    c = eng.round()
    assert c.dirty.clip(*a) == pages(t, "a", (3, 1), (7, 1), (100, 51))
    assert not c.dropped.clip(*a)
    assert c.pause_ms == 0.0
    assert not eng.round().dirty.clip(*a), "re-protected by the collect: nothing new"
    t.write("a", 0, 2, seed=3)
    t.write("a", 150, 1, seed=3)
    t.write("a", 199, 1, seed=3)
    assert eng.round().dirty.clip(*a) == pages(t, "a", (0, 2), (150, 1), (199, 1))
    final_round(fz, eng)


def test_rewriting_same_bytes_is_still_dirty(setup):
    """Unlike the digest tracker, a write of identical bytes counts."""
    t, fz, tr, eng = setup
    t.map("a", 8, guard=True)
    t.write("a", 0, 8, seed=1)
    eng.start()
    t.write("a", 4, 1, seed=1)
    assert eng.round().dirty.clip(*region(t, "a")) == pages(t, "a", (4, 1))


def test_shared_memory_writes(setup):
    t, fz, tr, eng = setup
    t.map("s", 32, "shared")
    t.write("s")
    eng.start()
    t.write("s", 9, 4, seed=5)
    c = eng.round()
    assert c.dirty.clip(*region(t, "s")) == pages(t, "s", (9, 4))
    final_round(fz, eng)


@pytest.mark.parametrize("obj", ["deleted-file", "memfd"])
def test_pages_found_in_the_object_go_once(setup, tmp_path, obj):
    """Pages of shared memory (here a deleted file mapped privately, or a
    memfd) its mapping does not show are found in the object and read; the
    read faults them in without the write-protect bit, and the next scan
    reported them written: every page of a deleted library the process had
    not touched went twice (7743 of 12481 pages of a numpy process whose
    package was upgraded, the second time inside the freeze) -- those of
    2 MiB blocks without a page table at the scan.  They go once; one the
    target writes after the read is still dirty.  4 MiB: at least one such
    block whatever the alignment."""
    t, fz, tr, eng = setup
    n = 1024
    if obj == "memfd":
        t.map("f", n, "memfd")
        lo, hi = region(t, "f")
        fd = os.open(f"/proc/{t.pid}/map_files/{lo:x}-{hi:x}", os.O_RDWR)
        try:
            os.pwrite(fd, b"\x33" * (n * P), 0)
        finally:
            os.close(fd)
    else:
        path = tmp_path / "lib.so"
        path.write_bytes(b"\x33" * (n * P))
        t.map_file("f", str(path), n)
        os.unlink(path)
    t.touch("f", 0, 2)
    f = region(t, "f")
    assert eng.start().dirty.clip(*f) == pages(t, "f", (0, n))    # n - 2 from the object
    again = eng.round().dirty.clip(*f)
    assert not again, f"{again.total_pages()} of {n} pages sent again"
    t.fill("f", 5, 1, 0x44)
    t.fill("f", n - 1, 1, 0x44)
    assert eng.round().dirty.clip(*f) == pages(t, "f", (5, 1), (n - 1, 1))
    final_round(fz, eng)


def test_new_mapping_after_start(setup):
    t, fz, tr, eng = setup
    t.map("a", 16, guard=True)
    t.write("a")
    eng.start()
    t.map("new", 40, guard=True)
    t.write("new", 5, 10, seed=4)
    c = eng.round()
    n = region(t, "new")
    assert c.dirty.clip(*n) == pages(t, "new", (5, 10))
    assert not c.dirty.clip(*region(t, "a"))
    t.write("new", 30, 2, seed=6)            # armed now: exact from here on
    assert eng.round().dirty.clip(*n) == pages(t, "new", (30, 2))
    final_round(fz, eng)


def test_dontneed_and_munmap_dropped(setup):
    t, fz, tr, eng = setup
    t.map("a", 64, guard=True)
    t.map("b", 16, guard=True)
    t.write("a")
    t.write("b")
    eng.start()
    t.dontneed("a", 10, 5)
    b = region(t, "b")
    t.unmap("b")
    c = eng.round()
    a = region(t, "a")
    assert c.dropped.clip(*a) == pages(t, "a", (10, 5))
    assert c.dropped.clip(*b) == PageRuns.from_range(*b)
    assert not c.dirty.clip(*a) and not c.dirty.clip(*b)
    t.write("a", 11, 1, seed=8)              # refault after DONTNEED: dirty again
    c = eng.round()
    assert c.dirty.clip(*a) == pages(t, "a", (11, 1))
    final_round(fz, eng)


def test_dontneed_then_read_fault_is_not_stale(setup):
    t, fz, tr, eng = setup
    t.map("a", 32, guard=True)
    t.write("a")
    eng.start()
    t.dontneed("a", 20, 2)
    t.touch("a", 20, 2)                       # maps the zero page
    c = eng.round()
    a = region(t, "a")
    assert c.dirty.clip(*a).union(c.dropped.clip(*a)) == pages(t, "a", (20, 2))
    final_round(fz, eng)


def test_mremap_and_mprotect(setup):
    t, fz, tr, eng = setup
    t.map("m", 16)
    t.write("m")
    t.map("p", 32, guard=True)
    t.write("p")
    eng.start()
    old = region(t, "m")
    t.remap("m", 24, move=True)               # registration dropped by the move
    t.write("m", 20, 2, seed=3)
    t.protect("p", 8, 8, "r")                 # VMA split: both halves stay armed
    c = eng.round()
    assert c.dirty.contains(pages(t, "m", (20, 2)))
    assert c.dropped.contains(PageRuns.from_range(*old).subtract(
        PageRuns.from_range(*region(t, "m"))))
    assert not c.dirty.clip(*region(t, "p"))
    t.protect("p", 8, 8, "rw")
    t.write("p", 9, 1, seed=5)
    t.write("m", 1, 1, seed=5)
    c = eng.round()
    assert c.dirty.clip(*region(t, "p")) == pages(t, "p", (9, 1))
    assert c.dirty.clip(*region(t, "m")) == pages(t, "m", (1, 1))
    final_round(fz, eng)


def test_unsent_pages_are_reported_again(setup):
    t, fz, tr, eng = setup
    t.map("a", 64, guard=True)
    t.write("a")
    c = tr.start(read_layout(t.pid))
    skipped = pages(t, "a", (8, 8))
    eng.send(c, skip=skipped)
    assert eng.round().dirty.clip(*region(t, "a")) == skipped
    final_round(fz, eng)


def test_continuous_writer_loses_nothing(setup):
    t, fz, tr, eng = setup
    n = 251                                   # prime to 256: every lap changes bytes
    t.map("hot", n, guard=True)
    t.write("hot", 0, n)
    t.spin("hot")
    try:
        eng.start()
        caught = 0
        for _ in range(4):
            time.sleep(0.05)
            c = eng.round()
            assert c.pause_ms == 0.0
            caught += c.dirty.clip(*region(t, "hot")).total_pages()
        assert caught > 0
        final_round(fz, eng)                  # mirror == memory, frozen
    finally:
        written = t.stop_spin("hot")
    assert written > n


@pytest.mark.parametrize("how", ["exit", "zombie"])
def test_pid_exits_mid_round(setup, how):
    t, fz, tr, eng = setup
    t.map("a", 8, guard=True)
    t.write("a")
    layout = read_layout(t.pid)
    eng.start()
    if how == "exit":
        t.exit(0)
    else:
        os.kill(t.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(f"/proc/{t.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
    with pytest.raises(NoSuchProcess) as ei:
        tr.collect(layout)
    assert ei.value.pid == t.pid


SECCOMPED = r"""
import ctypes, sys
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
# One BPF instruction: return SECCOMP_RET_ALLOW.
insn = (ctypes.c_uint16 * 4)(0x06, 0, 0, 0)
ctypes.c_uint32.from_address(ctypes.addressof(insn) + 4).value = 0x7FFF0000
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
prog = Prog(1, ctypes.addressof(insn))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
assert libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) == 0
print("ready", flush=True)
sys.stdin.readline()
"""


def test_seccomp_target_refused():
    from migrated.errors import KernelUnsupported
    p = subprocess.Popen([sys.executable, "-c", SECCOMPED], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert "seccomp" in uffd_wp_target_problem(p.pid)
        with UffdWpTracker(p.pid) as tr, pytest.raises(KernelUnsupported, match="seccomp"):
            tr.start(read_layout(p.pid))
        released(p.pid)
    finally:
        p.kill()
        p.wait(10)


def test_target_problem_none_for_plain_target(target):
    assert uffd_wp_target_problem(target.pid) is None


def test_gone_before_setup(target):
    pid = target.pid
    target.exit(0)
    with pytest.raises(NoSuchProcess):
        UffdWpTracker(pid).start(Layout())


def test_close_clears_write_protect(target):
    target.map("a", 32, guard=True)
    target.write("a")
    a0, a1 = target.range("a")
    tr = UffdWpTracker(target.pid)
    tr.start(read_layout(target.pid))
    with pm.Pagemap(target.pid) as p:
        assert pm.is_uffd_wp(p.read(a0, a1)).all()
        tr.close()
        assert not pm.is_uffd_wp(p.read(a0, a1)).any()
    assert "uw" not in open(f"/proc/{target.pid}/smaps").read().split(f"{a0:x}-")[1][:2000]


def test_probe_helper():
    from migrated.kernel import probe as kprobe
    ok, why = uffd_wp_tracker_available()
    facts = kprobe.cached_probe()
    kernel_can = (os.uname().machine == "x86_64" and facts["uffd_wp_async"]
                  and "written" in facts["pagemap_scan_categories"])
    if not kernel_can:
        assert not ok
        pytest.skip(f"kernel lacks uffd-wp: {why}")
    assert ok, f"kernel offers async uffd-wp but the self-test failed: {why}"
    assert "self-test" in why


# -- measurement (opt-in: MIGRATED_BENCH=1) ------------------------------------------


# 1 GiB resident, 1% written (100 pages in every 10000): the final frozen
# collect of each tracker on the same target.
BENCH_BYTES = 1 << 30
BENCH_STRIDE, BENCH_RUN = 10000, 100
BENCH_DIRTY = -(-(BENCH_BYTES // PAGE_SIZE) // BENCH_STRIDE) * BENCH_RUN


@pytest.mark.skipif(os.environ.get("MIGRATED_BENCH") != "1", reason="set MIGRATED_BENCH=1")
def test_bench_collect_1gib_1pct(target):
    from migrated.kernel.trackers import DigestTracker
    npages = BENCH_BYTES // P
    target.map("big", npages)
    target.cmd("write", "big", 0, npages, 1, timeout=120)
    out = {}
    for seed, cls in ((2, UffdWpTracker), (3, DigestTracker)):
        with Freezer(target.pid) as fz, cls(target.pid, fz) as tr:
            eng = MiniEngineFast(tr, target.pid)
            t0 = time.perf_counter()
            first = tr.start(read_layout(target.pid))
            start_ms = (time.perf_counter() - t0) * 1000
            eng.send(first)
            for k in range(0, npages, BENCH_STRIDE):
                target.cmd("write", "big", k, min(BENCH_RUN, npages - k), seed)
            lay = read_layout(target.pid)
            fz.freeze()
            try:
                t0 = time.perf_counter()
                c = tr.collect(lay)
                ms = (time.perf_counter() - t0) * 1000
            finally:
                fz.thaw()
            out[tr.name] = {"collect_ms": round(ms, 1), "start_ms": round(start_ms, 1),
                            "dirty": c.dirty.clip(*target.range("big")).total_pages()}
    print(f"\n1 GiB resident, 1% written, frozen collect: {out}")
    assert out["uffd-wp"]["dirty"] == out["digest"]["dirty"] == BENCH_DIRTY


class MiniEngineFast:
    """Send = read and confirm, without keeping a mirror (1 GiB)."""

    def __init__(self, tracker, pid):
        from migrated.kernel.reader import MemReader
        self.tracker, self.reader = tracker, MemReader(pid)

    def send(self, c):
        for chunk in self.reader.read(c.dirty):
            self.tracker.sent(chunk.runs, chunk.data)
