"""Hypothesis strategies for every message of protocol v1."""

from __future__ import annotations

import xxhash
from hypothesis import strategies as st

from migrated.runs import PAGE_SIZE, PageRuns
from migrated.wire import (KINDS, Accept, Cancel, CommitRequest, Committed,
                           Dropped, Error, FinalEnd, Freeze, Hello, Keepalive,
                           Layout, MappingInfo, Pages, Release, Released, RoundEnd,
                           WITHDRAW_OUTCOMES, Withdraw, Withdrawn,
                           Start, Welcome,
                           Zeros)
from migrated.wire import limits as L

tokens = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,30}", fullmatch=True)
names = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                max_size=40).filter(lambda s: len(s.encode()) <= L.MAX_NODE_BYTES)
# Linux paths and arguments are bytes; non-UTF-8 ones travel via surrogateescape.
os_strings = st.binary(max_size=60).filter(lambda b: b"\0" not in b).map(
    lambda b: b.decode("utf-8", "surrogateescape"))
rounds = st.integers(0, L.MAX_ROUND)
figures = st.floats(0, 1e18, allow_nan=False, allow_infinity=False)
u63 = st.integers(0, L.U63_MAX)
total_pages = st.integers(0, L.MAX_TOTAL_PAGES)
digests = st.binary(min_size=16, max_size=16)


@st.composite
def page_runs(draw, max_runs=20, max_count=8, max_gap=1 << 30):
    n = draw(st.integers(1, max_runs))
    addr = draw(st.integers(0, 1 << 20)) * PAGE_SIZE
    pairs = []
    for _ in range(n):
        addr += draw(st.integers(1, max_gap)) * PAGE_SIZE
        c = draw(st.integers(1, max_count))
        pairs.append((addr, c))
        addr += c * PAGE_SIZE
    return PageRuns.from_pairs(pairs)


@st.composite
def pages(draw):
    runs = draw(page_runs(max_runs=4, max_count=3))
    n = runs.total_pages() * PAGE_SIZE
    seed = draw(st.binary(min_size=1, max_size=32))  # small examples, any bytes
    data = (seed * (n // len(seed) + 1))[:n]
    return Pages(draw(rounds), runs, data, xxhash.xxh3_128_digest(data))


perms = st.builds(lambda r, w, x, s: r + w + x + s, st.sampled_from("r-"),
                  st.sampled_from("w-"), st.sampled_from("x-"), st.sampled_from("ps"))


@st.composite
def layouts(draw):
    n = draw(st.integers(0, 12))
    addr = draw(st.integers(0, 1 << 20)) * PAGE_SIZE
    ms = []
    for _ in range(n):
        addr += draw(st.integers(0, 1 << 16)) * PAGE_SIZE
        size = draw(st.integers(1, 1 << 16)) * PAGE_SIZE
        ms.append(MappingInfo(addr, addr + size, draw(perms),
                              draw(st.integers(0, 1 << 30)) * PAGE_SIZE,
                              draw(os_strings), draw(st.sampled_from(KINDS)),
                              draw(st.integers(0, 7))))
        addr += size
    return Layout(draw(rounds), ms)


option_values = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 64 - 1),
                          st.floats(allow_nan=False, allow_infinity=False),
                          st.text(max_size=40))

EVENTS = {
    "hello": st.builds(Hello, st.lists(st.integers(1, 0xFFFF), min_size=1, max_size=16,
                                       unique=True),
                       names, st.lists(tokens, max_size=32, unique=True), tokens),
    "welcome": st.builds(Welcome, st.integers(1, 0xFFFF), names,
                         st.lists(tokens, max_size=32, unique=True)),
    "start": st.builds(Start, st.integers(1, L.PID_MAX_LIMIT),
                       st.lists(os_strings, max_size=8), os_strings,
                       st.sampled_from([4096, 8192, 16384, 65536]), tokens, u63,
                       st.dictionaries(tokens, option_values, max_size=8)),
    "accept": st.builds(Accept, st.integers(1, L.MAX_BATCH_PAGES), u63),
    "layout": layouts(),
    "pages": pages(),
    "zeros": st.builds(Zeros, rounds, page_runs()),
    "dropped": st.builds(Dropped, rounds, page_runs()),
    "round-end": st.builds(RoundEnd, rounds, total_pages, u63, figures, figures,
                           figures, figures),
    "freeze": st.builds(Freeze, rounds),
    "final-end": st.builds(FinalEnd, rounds, total_pages),
    "commit-request": st.builds(CommitRequest, total_pages, st.none() | digests),
    "committed": st.builds(Committed, tokens, tokens),
    "release": st.builds(Release, tokens),
    "released": st.builds(Released, tokens),
    "withdraw": st.builds(Withdraw, tokens),
    "withdrawn": st.builds(Withdrawn, tokens, st.sampled_from(WITHDRAW_OUTCOMES)),
    "error": st.builds(Error, tokens, st.text(max_size=200)),
    "cancel": st.builds(Cancel, st.text(max_size=200)),
    "keepalive": st.builds(Keepalive, st.integers(0, 2 ** 64 - 1)),
}
any_event = st.one_of(*EVENTS.values())
