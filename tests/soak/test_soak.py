"""Soak (issue 5 item 6), short: back-to-back migrations between two
daemons must not grow either daemon's open files, threads or memory
beyond a small bound.  benchmarks/soak.py runs 100 and prints figures."""

from __future__ import annotations

import pytest

from tests.soak.runner import soak

MIGRATIONS = 10
# Resident memory: the first migrations grow the allocators' pools (glibc
# keeps freed 8 MiB read buffers in its arenas once its mmap threshold has
# risen) and then it levels off.  Until session 14 the destination also
# moved by steps of up to ~16 MiB and drifted up by about 0.35 MiB per
# migration (72 -> 215 MiB over 150): each finished DestMigration sat in a
# reference cycle with its receive buffers until the cyclic collector ran
# (tests/engine/test_lifetime.py).  Since, over ten migrations: source
# +0.1 MiB, destination +0.3 to +2.4 (and +4.5 over 150).  A leak grows
# linearly instead: keeping one migration's buffers costs the source 32 MiB
# and the destination 8 MiB *per migration* (40 MiB over the second half
# of this run).  So: a bound on the total, a tighter one on the second
# half.
RSS_GROWTH_LIMIT_KIB = 32 * 1024
RSS_SECOND_HALF_LIMIT_KIB = 16 * 1024
FD_GROWTH_LIMIT = 0
THREAD_GROWTH_LIMIT = 0


@pytest.mark.slow
def test_back_to_back_migrations_do_not_grow_the_daemons():
    rep = soak(MIGRATIONS, mib=8, tls=True)
    print("\n".join(rep.lines()))
    assert not rep.failures, rep.failures
    for name in rep.before:
        g = rep.growth(name)
        assert g.fds <= FD_GROWTH_LIMIT, f"{name}: {g.fds} more open files\n" + \
            "\n".join(rep.lines())
        assert g.threads <= THREAD_GROWTH_LIMIT, f"{name}: {g.threads} more threads"
        assert g.rss_kib <= RSS_GROWTH_LIMIT_KIB, \
            f"{name}: resident memory grew {g.rss_kib / 1024:.1f} MiB over {MIGRATIONS} " \
            "migrations\n" + "\n".join(rep.lines())
        half = rep.second_half_growth_kib(name)
        assert half <= RSS_SECOND_HALF_LIMIT_KIB, \
            f"{name}: resident memory still growing, {half / 1024:.1f} MiB over the last " \
            f"{MIGRATIONS // 2} migrations\n" + "\n".join(rep.lines())
