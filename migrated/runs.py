"""PageRuns: a set of page ranges held as two numpy arrays.

Every layer speaks in runs of pages (address, page count): dirty sets,
present pages, wire batches and image contents.  All operations are
vectorised; nothing here loops in Python once per page.
"""

from __future__ import annotations

import bisect
import os
from typing import Iterable, Iterator

import numpy as np

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1

_U64 = np.uint64


def _as_u64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=_U64)


class PageRuns:
    """Sorted, disjoint, coalesced runs of pages.

    ``starts`` are page-aligned virtual addresses, ``counts`` page counts
    (both ``np.uint64``).  Instances are treated as immutable.
    """

    __slots__ = ("starts", "counts")

    def __init__(self, starts, counts, *, normalized: bool = False):
        s = _as_u64(starts)
        c = _as_u64(counts)
        if s.shape != c.shape or s.ndim != 1:
            raise ValueError("starts and counts must be 1-D arrays of one length")
        if not normalized:
            s, c = _normalize(s, c)
        self.starts = s
        self.counts = c

    # -- constructors ------------------------------------------------------

    @classmethod
    def empty(cls) -> "PageRuns":
        return cls(np.empty(0, _U64), np.empty(0, _U64), normalized=True)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, int]]) -> "PageRuns":
        arr = np.array(list(pairs), dtype=_U64).reshape(-1, 2)
        return cls(arr[:, 0], arr[:, 1])

    @classmethod
    def from_range(cls, start: int, end: int) -> "PageRuns":
        if end <= start:
            return cls.empty()
        return cls(np.array([start], _U64),
                   np.array([(end - start) >> PAGE_SHIFT], _U64), normalized=True)

    @classmethod
    def from_mask(cls, base: int, mask: np.ndarray) -> "PageRuns":
        """Runs of True entries of ``mask``; entry i is page base + i*PAGE."""
        m = np.asarray(mask, dtype=bool)
        if m.size == 0:
            return cls.empty()
        d = np.diff(m.view(np.int8), prepend=np.int8(0), append=np.int8(0))
        begin = np.flatnonzero(d == 1)
        end = np.flatnonzero(d == -1)
        starts = _U64(base) + begin.astype(_U64) * _U64(PAGE_SIZE)
        return cls(starts, (end - begin).astype(_U64), normalized=True)

    @classmethod
    def concat(cls, parts: Iterable["PageRuns"]) -> "PageRuns":
        parts = list(parts)
        if not parts:
            return cls.empty()
        return cls(np.concatenate([p.starts for p in parts]),
                   np.concatenate([p.counts for p in parts]))

    # -- queries -----------------------------------------------------------

    def __len__(self) -> int:
        return int(self.starts.size)

    def __bool__(self) -> bool:
        return self.starts.size > 0

    def __eq__(self, other) -> bool:
        return (isinstance(other, PageRuns)
                and np.array_equal(self.starts, other.starts)
                and np.array_equal(self.counts, other.counts))

    def __repr__(self) -> str:
        head = ", ".join(f"({s:#x}, {c})" for s, c in self.pairs()[:4])
        more = "" if len(self) <= 4 else f", ... {len(self) - 4} more"
        return f"PageRuns([{head}{more}])"

    def total_pages(self) -> int:
        c = self.counts
        if c.size == 1:
            return int(c[0])
        return int(c.sum()) if c.size else 0

    def total_bytes(self) -> int:
        return self.total_pages() * PAGE_SIZE

    def ends(self) -> np.ndarray:
        return self.starts + self.counts * _U64(PAGE_SIZE)

    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.starts.tolist(), self.counts.tolist()))

    # -- set algebra (on boundaries, never per page) ------------------------

    def union(self, other: "PageRuns") -> "PageRuns":
        return PageRuns(np.concatenate([self.starts, other.starts]),
                        np.concatenate([self.counts, other.counts]))

    def intersect(self, other: "PageRuns") -> "PageRuns":
        return _combine(self, other, lambda a, b: a & b)

    def subtract(self, other: "PageRuns") -> "PageRuns":
        if other.starts.size == 1 and self.starts.size:
            return self._minus_one_run(int(other.starts[0]), int(other.counts[0]))
        return _combine(self, other, lambda a, b: a & ~b)

    def _minus_one_run(self, a: int, n: int) -> "PageRuns":
        """This set without pages [a, a + n pages): what the source takes
        off its pending set once per read buffer.  Two binary searches
        find the runs that overlap; the rest is kept as it is, so the cost
        does not grow with the number of runs the way the general
        combination (a sort of every boundary) does."""
        if n <= 0:
            return self
        s, c = self.starts, self.counts
        b = a + (n << PAGE_SHIFT)
        lo = bisect.bisect_right(s, a) - 1          # last run starting at or before a
        if lo < 0 or int(s[lo]) + (int(c[lo]) << PAGE_SHIFT) <= a:
            lo += 1                                  # it ends before a: not touched
        hi = bisect.bisect_left(s, b)               # runs [lo, hi) start before b
        if lo >= hi:
            return self
        keep_s: list[int] = []
        keep_c: list[int] = []
        first = int(s[lo])
        if first < a:
            keep_s.append(first)
            keep_c.append((a - first) >> PAGE_SHIFT)
        last_end = int(s[hi - 1]) + (int(c[hi - 1]) << PAGE_SHIFT)
        if last_end > b:
            keep_s.append(b)
            keep_c.append((last_end - b) >> PAGE_SHIFT)
        if lo == 0 and hi == s.size:
            return PageRuns(np.array(keep_s, _U64), np.array(keep_c, _U64), normalized=True)
        return PageRuns(np.concatenate([s[:lo], np.array(keep_s, _U64), s[hi:]]),
                        np.concatenate([c[:lo], np.array(keep_c, _U64), c[hi:]]),
                        normalized=True)

    def clip(self, start: int, end: int) -> "PageRuns":
        return self.intersect(PageRuns.from_range(start, end))

    def contains(self, other: "PageRuns") -> bool:
        """Every page of ``other`` is in this set.  Both sets are coalesced,
        so each run of ``other`` must lie inside one run of this one: one
        searchsorted for all of them."""
        if not other:
            return True
        if not self:
            return False
        if other.starts.size == 1:
            # One run (most page batches): a bisect, no array temporaries.
            a = int(other.starts[0])
            k = bisect.bisect_right(self.starts, a) - 1
            return k >= 0 and (a + (int(other.counts[0]) << PAGE_SHIFT)
                               <= int(self.starts[k]) + (int(self.counts[k]) << PAGE_SHIFT))
        i = np.searchsorted(self.starts, other.starts, side="right").astype(np.int64) - 1
        if (i < 0).any():
            return False
        return bool((other.ends() <= self.ends()[i]).all())

    def split(self, max_pages: int) -> Iterator["PageRuns"]:
        """Yield consecutive pieces of at most ``max_pages`` pages each."""
        if max_pages <= 0:
            raise ValueError("max_pages must be positive")
        if not self:
            return
        if self.starts.size == 1:
            # One run (a read buffer, a bulk batch): pieces by integer
            # arithmetic, without the cumulative-count machinery below.
            first, n = int(self.starts[0]), int(self.counts[0])
            if n <= max_pages:
                yield self
                return
            for k in range(0, n, max_pages):
                yield PageRuns(np.array([first + (k << PAGE_SHIFT)], _U64),
                               np.array([min(max_pages, n - k)], _U64), normalized=True)
            return
        # Cut runs longer than max_pages first so each piece can be found
        # with one searchsorted over the cumulative page counts.
        starts, counts = _cut(self.starts, self.counts, max_pages)
        cum = np.cumsum(counts)
        total = int(cum[-1])
        lo_run, lo_off = 0, 0  # first run of the piece, pages already used from it
        done = 0
        while done < total:
            target = done + max_pages
            hi = int(np.searchsorted(cum, target, side="left"))
            if hi >= counts.size:
                hi = counts.size - 1
                target = total
            s = starts[lo_run:hi + 1].copy()
            c = counts[lo_run:hi + 1].copy()
            s[0] += _U64(lo_off * PAGE_SIZE)
            c[0] -= _U64(lo_off)
            take_last = target - (int(cum[hi]) - int(counts[hi]))
            if hi == lo_run:
                c[-1] = _U64(take_last - lo_off)
            else:
                c[-1] = _U64(take_last)
            yield PageRuns(s, c, normalized=True) if _is_norm(s, c) else PageRuns(s, c)
            done = target
            if take_last == int(counts[hi]):
                lo_run, lo_off = hi + 1, 0
            else:
                lo_run, lo_off = hi, take_last

    def to_mask(self, base: int, npages: int) -> np.ndarray:
        """Boolean page mask of this set restricted to [base, base+npages)."""
        mask = np.zeros(npages, dtype=bool)
        if not self or npages == 0:
            return mask
        clipped = self.clip(base, base + npages * PAGE_SIZE)
        if not clipped:
            return mask
        first = ((clipped.starts - _U64(base)) >> _U64(PAGE_SHIFT)).astype(np.int64)
        last = first + clipped.counts.astype(np.int64)
        delta = np.zeros(npages + 1, dtype=np.int32)
        np.add.at(delta, first, 1)
        np.add.at(delta, last, -1)
        return np.cumsum(delta[:-1]) > 0

    def page_addresses(self) -> np.ndarray:
        """Every page address (vectorised; size = total_pages())."""
        n = self.total_pages()
        if n == 0:
            return np.empty(0, _U64)
        reps = np.repeat(self.starts, self.counts.astype(np.int64))
        offs = np.arange(n, dtype=_U64) - np.repeat(
            np.cumsum(self.counts) - self.counts, self.counts.astype(np.int64))
        return reps + offs * _U64(PAGE_SIZE)


# -- helpers ---------------------------------------------------------------

def _is_norm(s: np.ndarray, c: np.ndarray) -> bool:
    if s.size <= 1:
        return bool(s.size == 0 or c[0] > 0)
    if (c == 0).any():
        return False
    ends = s + c * _U64(PAGE_SIZE)
    return bool((ends[:-1] < s[1:]).all())


def _normalize(s: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if s.size == 1 and c[0] > 0:
        # One run, the usual page batch: nothing to sort or merge, and a
        # dozen numpy calls on one element cost more than the batch's
        # bookkeeping needs.  Copies, as below: never the caller's arrays.
        if int(s[0]) & (PAGE_SIZE - 1):
            raise ValueError("page run start not page aligned")
        return s.copy(), c.copy()
    keep = c > 0
    s, c = s[keep], c[keep]
    if s.size == 0:
        return s.copy(), c.copy()
    if (s & _U64(PAGE_SIZE - 1)).any():
        raise ValueError("page run start not page aligned")
    order = np.argsort(s, kind="stable")
    s, c = s[order], c[order]
    e = s + c * _U64(PAGE_SIZE)
    # Merge overlapping or adjacent runs: a new group begins where the
    # start exceeds the running maximum of the previous ends.
    run_max = np.maximum.accumulate(e)
    new_group = np.empty(s.size, dtype=bool)
    new_group[0] = True
    new_group[1:] = s[1:] > run_max[:-1]
    idx = np.flatnonzero(new_group)
    gs = s[idx]
    ge = np.maximum.reduceat(e, idx)
    return gs, (ge - gs) >> _U64(PAGE_SHIFT)


def _cut(s: np.ndarray, c: np.ndarray, max_pages: int):
    if not (c > _U64(max_pages)).any():
        return s, c
    pieces = ((c + _U64(max_pages - 1)) // _U64(max_pages)).astype(np.int64)
    rs = np.repeat(s, pieces)
    rc = np.repeat(c, pieces)
    first = np.cumsum(pieces) - pieces
    k = (np.arange(rs.size) - np.repeat(first, pieces)).astype(_U64)
    starts = rs + k * _U64(max_pages * PAGE_SIZE)
    counts = np.minimum(rc - k * _U64(max_pages), _U64(max_pages))
    return starts, counts


def _combine(a: PageRuns, b: PageRuns, op) -> PageRuns:
    """Boolean combination of two run sets over their joint boundaries."""
    if not a and not b:
        return PageRuns.empty()
    bounds = np.unique(np.concatenate([a.starts, a.ends(), b.starts, b.ends()]))
    if bounds.size < 2:
        return PageRuns.empty()
    lefts = bounds[:-1]

    def covered(r: PageRuns) -> np.ndarray:
        if not r:
            return np.zeros(lefts.size, dtype=bool)
        i = np.searchsorted(r.starts, lefts, side="right") - 1
        ok = i >= 0
        res = np.zeros(lefts.size, dtype=bool)
        ii = i[ok]
        res[ok] = lefts[ok] < r.starts[ii] + r.counts[ii] * _U64(PAGE_SIZE)
        return res

    keep = op(covered(a), covered(b))
    s = lefts[keep]
    c = (bounds[1:][keep] - s) >> _U64(PAGE_SHIFT)
    return PageRuns(s, c)
