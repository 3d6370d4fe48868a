"""reader.py on real children: exact bytes, batching, vanished mappings, exit."""

import pytest

from migrated.errors import NoSuchProcess
from migrated.kernel import reader as reader_mod
from migrated.kernel.reader import MemReader
from migrated.runs import PAGE_SIZE, PageRuns
from tests.target import expected

P = PAGE_SIZE


def collect(reader, runs):
    """Concatenate all chunks: (ok runs, bytes, failed runs)."""
    oks, data, fails = [], [], []
    for ch in reader.read(runs):
        assert len(ch.data) == ch.runs.total_bytes()
        oks.append(ch.runs)
        data.append(bytes(ch.data))
        fails.append(ch.failed)
    return PageRuns.concat(oks), b"".join(data), PageRuns.concat(fails)


def expected_runs(runs, seed):
    return b"".join(expected(a, n, seed) for a, n in runs.pairs())


def test_exact_bytes_one_region(target):
    target.map("a", 64)
    target.write("a", seed=5)
    runs = PageRuns.from_pairs([(target.addr("a"), 64)])
    ok, data, failed = collect(MemReader(target.pid), runs)
    assert ok == runs and not failed
    assert data == target.expected("a", seed=5)


@pytest.mark.parametrize("buffer_pages", [1, 5, 4096])
def test_scattered_runs_over_iovec_limit(target, buffer_pages):
    # 1500 separate runs: more than UIO_MAXIOV iovecs in one buffer.
    target.map("b", 3000)
    target.write("b", seed=9)
    runs = PageRuns.from_pairs([(target.addr("b", i), 1) for i in range(0, 3000, 2)])
    r = MemReader(target.pid, buffer_pages=buffer_pages)
    ok, data, failed = collect(r, runs)
    assert ok == runs and not failed
    assert data == expected_runs(runs, 9)
    if buffer_pages == 4096:
        assert r.syscalls == 2   # 1500 iovecs -> 1024 + 476


def test_vanished_mapping_is_reported_not_fatal(target):
    for name in ("a", "b", "c"):
        target.map(name, 50, guard=True)
        target.write(name, seed=2)
    runs = PageRuns.concat([PageRuns.from_pairs([target.range(n)[:1] + (50,)])
                            for n in ("a", "b", "c")])
    b = PageRuns.from_pairs([(target.addr("b"), 50)])
    target.unmap("b")
    r = MemReader(target.pid)
    ok, data, failed = collect(r, runs)
    assert failed == b
    assert ok == runs.subtract(b)
    assert data == expected_runs(ok, 2)
    # a whole vanished run costs two faults, not one call per page
    assert r.syscalls <= 4


def test_single_page_hole_costs_one_page(target):
    target.map("a", 20, guard=True)
    target.write("a", seed=3)
    target.unmap("a", 5, 1)
    runs = PageRuns.from_pairs([(target.addr("a"), 20)])
    ok, data, failed = collect(MemReader(target.pid), runs)
    hole = PageRuns.from_pairs([(target.addr("a", 5), 1)])
    assert failed == hole
    assert data == expected_runs(runs.subtract(hole), 3)


def test_two_page_hole_gives_up_rest_of_run(target):
    # Documented cost bound: after two consecutive faults the rest of the
    # run is reported failed without trying it.
    target.map("a", 20, guard=True)
    target.write("a", seed=3)
    target.unmap("a", 5, 2)
    runs = PageRuns.from_pairs([(target.addr("a"), 20)])
    ok, data, failed = collect(MemReader(target.pid), runs)
    assert failed == PageRuns.from_pairs([(target.addr("a", 5), 15)])
    assert ok == PageRuns.from_pairs([(target.addr("a"), 5)])
    assert data == target.expected("a", 0, 5, seed=3)


def test_unmapped_between_chunks(target):
    """A mapping vanishing while a read is in progress (between two chunks
    of the same read) ends up in `failed` of the later chunk."""
    target.map("a", 8, guard=True)
    target.map("b", 8, guard=True)
    target.write("a", seed=1)
    target.write("b", seed=1)
    runs = PageRuns.from_pairs([(target.addr("a"), 8), (target.addr("b"), 8)])
    first_half = runs.clip(*target.range("a")) if target.addr("a") < target.addr("b") \
        else runs.clip(*target.range("b"))
    later = "b" if target.addr("a") < target.addr("b") else "a"
    it = MemReader(target.pid, buffer_pages=8).read(runs)
    ch = next(it)
    assert ch.runs == first_half and not ch.failed
    target.unmap(later, 3, 5)            # the tail of the later region goes
    ch = next(it)
    assert ch.failed == PageRuns.from_pairs([(target.addr(later, 3), 5)])
    assert bytes(ch.data) == target.expected(later, 0, 3, seed=1)
    assert next(it, None) is None


def test_protnone_pages_fail(target):
    target.map("a", 6, guard=True)
    target.write("a")
    target.protect("a", 2, 1, "none")
    runs = PageRuns.from_pairs([(target.addr("a"), 6)])
    ok, data, failed = collect(MemReader(target.pid), runs)
    assert failed == PageRuns.from_pairs([(target.addr("a", 2), 1)])


def test_process_exit_is_no_such_process(target):
    target.map("a", 16)
    target.write("a")
    runs = PageRuns.from_pairs([(target.addr("a"), 16)])
    it = MemReader(target.pid, buffer_pages=4).read(runs)
    next(it)
    pid = target.pid
    target.close()
    with pytest.raises(NoSuchProcess, match=f"process {pid} does not exist"):
        next(it)


def test_read_range(target):
    target.map("a", 4, guard=True)
    target.write("a", seed=4)
    r = MemReader(target.pid)
    assert r.read_range(target.addr("a") + 100, 2 * P) == target.expected("a", seed=4)[100:100 + 2 * P]
    with pytest.raises(OSError):
        r.read_range(target.addr("a"), 5 * P)   # runs into the guard page


def test_no_iovec_limit_violation(target, monkeypatch):
    # A smaller iovec cap exercises the batching loop with few pages.
    monkeypatch.setattr(reader_mod, "UIO_MAXIOV", 3)
    target.map("a", 40)
    target.write("a", seed=6)
    runs = PageRuns.from_pairs([(target.addr("a", i), 1) for i in range(0, 40, 3)])
    r = reader_mod.MemReader(target.pid)
    ok, data, failed = collect(r, runs)
    assert data == expected_runs(runs, 6) and not failed
    assert r.syscalls == 5   # 14 runs / 3 per call


def _thp_eligible(addr: int) -> bool | None:
    """The THPeligible flag /proc/self/smaps gives the mapping at ``addr``
    (None on kernels that do not print it)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "THPeligible:":
                return line.split()[1] == "1"
    return None


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "none"
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"),
                    reason="this kernel gives no transparent huge pages")
def test_large_buffers_ask_for_huge_pages():
    """The source's read buffers (MiBs, copied into and read twice per
    batch) are eligible for transparent huge pages; a small one is left as
    the kernel's default has it."""
    big = MemReader(1, buffer_bytes=16 << 20)
    assert _thp_eligible(big._buf.ctypes.data) is True
    if _thp_mode() == "madvise":
        small = MemReader(1, buffer_pages=4)
        assert _thp_eligible(small._buf.ctypes.data) is False
