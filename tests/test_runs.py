"""PageRuns set algebra checked against plain Python sets of pages."""

import numpy as np
from hypothesis import given, settings, strategies as st

from migrated.runs import PAGE_SIZE, PageRuns

pages = st.sets(st.integers(0, 300), max_size=120)


def runs_of(pageset):
    return PageRuns.from_pairs([(p * PAGE_SIZE, 1) for p in pageset])


def pages_of(r: PageRuns):
    return {int(a) // PAGE_SIZE for a in r.page_addresses()}


@given(pages, pages)
def test_algebra_matches_sets(a, b):
    ra, rb = runs_of(a), runs_of(b)
    assert ra.contains(rb) == (b <= a)
    assert pages_of(ra) == a
    assert pages_of(ra.union(rb)) == a | b
    assert pages_of(ra.intersect(rb)) == a & b
    assert pages_of(ra.subtract(rb)) == a - b
    assert ra.total_pages() == len(a)


@given(pages, st.integers(1, 40))
@settings(max_examples=300)
def test_split_preserves_pages_and_bounds_pieces(a, k):
    r = runs_of(a)
    pieces = list(r.split(k))
    assert all(0 < p.total_pages() <= k for p in pieces)
    assert sum(p.total_pages() for p in pieces) == len(a)
    got = set()
    for p in pieces:
        assert not (pages_of(p) & got)
        got |= pages_of(p)
    assert got == a


@given(pages)
def test_mask_round_trip(a):
    mask = np.zeros(301, dtype=bool)
    mask[list(a)] = True
    r = PageRuns.from_mask(0, mask)
    assert pages_of(r) == a
    assert (r.to_mask(0, 301) == mask).all()


def test_coalesces_adjacent_and_overlapping():
    r = PageRuns.from_pairs([(0, 2), (2 * PAGE_SIZE, 3), (PAGE_SIZE, 1)])
    assert r.pairs() == [(0, 5)]


def test_rejects_unaligned():
    import pytest
    with pytest.raises(ValueError):
        PageRuns.from_pairs([(123, 1)])


def test_contains_holds_for_runs_in_any_order():
    inside = PageRuns.from_range(10 * PAGE_SIZE, 20 * PAGE_SIZE)
    # Hand-built, unsorted: the second run lies before every run of `inside`.
    stray = PageRuns(np.array([12 * PAGE_SIZE, 2 * PAGE_SIZE], np.uint64),
                     np.array([1, 1], np.uint64), normalized=True)
    assert not inside.contains(stray)
    assert inside.contains(PageRuns(np.array([15 * PAGE_SIZE, 11 * PAGE_SIZE], np.uint64),
                                    np.array([5, 2], np.uint64), normalized=True))
    assert inside.contains(PageRuns.empty()) and not PageRuns.empty().contains(inside)


def test_one_run_is_checked_and_copied_like_many():
    """A single run (the usual page batch) takes a short path: it is still
    checked, an empty run still vanishes, and the caller's arrays are
    never shared."""
    import pytest
    s, c = np.array([4 * PAGE_SIZE], np.uint64), np.array([3], np.uint64)
    r = PageRuns(s, c)
    s[0], c[0] = 0, 9
    assert r.pairs() == [(4 * PAGE_SIZE, 3)]
    assert not PageRuns(np.array([PAGE_SIZE], np.uint64), np.array([0], np.uint64))
    with pytest.raises(ValueError):
        PageRuns(np.array([PAGE_SIZE + 8], np.uint64), np.array([1], np.uint64))


@given(pages, st.integers(0, 300), st.integers(1, 40))
def test_one_run_containment_matches_sets(a, first, n):
    """contains() of a single run takes a short path (a bisect): it must
    agree with the set of pages."""
    one = PageRuns.from_range(first * PAGE_SIZE, (first + n) * PAGE_SIZE)
    assert runs_of(a).contains(one) == (set(range(first, first + n)) <= a)


@given(pages, st.integers(0, 320), st.integers(1, 60))
@settings(max_examples=300)
def test_one_run_subtraction_matches_sets_and_the_general_path(a, first, n):
    """subtract() of a single run (the source's pending set minus each read
    buffer) takes a short path: two binary searches.  It must agree with
    the set of pages and give exactly the runs the general combination
    gives (sorted, coalesced, nothing empty)."""
    from migrated.runs import _combine
    r = runs_of(a)
    one = PageRuns.from_range(first * PAGE_SIZE, (first + n) * PAGE_SIZE)
    got = r.subtract(one)
    assert pages_of(got) == a - set(range(first, first + n))
    assert got == _combine(r, one, lambda x, y: x & ~y)
    assert got.total_pages() == len(a - set(range(first, first + n)))


def test_one_run_subtraction_at_the_edges():
    r = PageRuns.from_pairs([(10 * PAGE_SIZE, 5), (20 * PAGE_SIZE, 5)])
    cut = lambda f, n: r.subtract(PageRuns.from_range(f * PAGE_SIZE, (f + n) * PAGE_SIZE))
    page = lambda p: p * PAGE_SIZE
    assert cut(15, 5) == r                                  # the gap between the runs
    assert cut(0, 10) == r and cut(25, 100) == r           # before and after all
    assert cut(10, 15).pairs() == []                        # exactly everything
    assert cut(12, 10).pairs() == [(page(10), 2), (page(22), 3)]   # across the gap
    assert cut(11, 1).pairs() == [(page(10), 1), (page(12), 3), (page(20), 5)]
    assert cut(24, 1).pairs() == [(page(10), 5), (page(20), 4)]


@given(st.integers(0, 1 << 20), st.integers(1, 5000), st.integers(1, 1100))
def test_one_run_splits_into_consecutive_pieces(first, n, k):
    """split() of a single run takes a short path; its pieces are the run
    cut every ``k`` pages, in order."""
    r = PageRuns.from_range(first * PAGE_SIZE, (first + n) * PAGE_SIZE)
    pieces = [p.pairs() for p in r.split(k)]
    want = [[((first + i) * PAGE_SIZE, min(k, n - i))] for i in range(0, n, k)]
    assert pieces == want
