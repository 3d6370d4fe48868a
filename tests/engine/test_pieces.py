"""How the source cuts a round into reads: a small first read, each next
one twice the last, up to the reader buffer -- so the final delta starts
leaving after 512 KiB is read, not after all of it."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from migrated.engine.source import ramped_pieces
from migrated.runs import PAGE_SIZE, PageRuns

P = PAGE_SIZE


@st.composite
def page_runs(draw):
    pairs = draw(st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 300)), max_size=20))
    return PageRuns.from_pairs([(0x10000000 + a * P, n) for a, n in pairs]) if pairs \
        else PageRuns.empty()


@settings(max_examples=300, deadline=None)
@given(page_runs(), st.integers(1, 64), st.integers(1, 2048))
def test_ramped_pieces_cover_the_runs_in_order_with_doubling_sizes(runs, first, most):
    pieces = list(ramped_pieces(runs, first, most))
    assert PageRuns.concat(pieces) == runs if pieces else not runs
    assert all(p for p in pieces)
    for a, b in zip(pieces, pieces[1:]):                  # address order, disjoint
        assert int(a.ends()[-1]) <= int(b.starts[0])
    sizes = [p.total_pages() for p in pieces]
    want, size = [], first
    left = runs.total_pages()
    while left > 0:
        take = min(size if size < most else most, left)
        want.append(take)
        left -= take
        if size < most:
            size *= 2
    assert sizes == want


def test_a_final_delta_of_a_few_mib_leaves_in_growing_pieces():
    delta = PageRuns.from_pairs([(0x7f0000000000 + k * 512 * P, 44) for k in range(20)])  # 880 pages
    sizes = [p.total_pages() for p in ramped_pieces(delta, 128, 4096)]
    assert sizes == [128, 256, 496]
    whole = PageRuns.from_range(0x7f0000000000, 0x7f0000000000 + 65536 * P)            # 256 MiB
    sizes = [p.total_pages() for p in ramped_pieces(whole, 128, 4096)]
    assert sizes[:6] == [128, 256, 512, 1024, 2048, 4096] and set(sizes[6:-1]) == {4096}
    assert sum(sizes) == 65536
