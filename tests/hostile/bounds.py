"""The bounds every hostile-peer test holds the daemon to."""

from __future__ import annotations

from tests.cluster import FAST_TIMEOUTS

# Every hostile connection must be closed within this: the daemon's
# longest relevant wait (handshake or idle timeout, 3 s in these tests)
# plus slack for a loaded 2-core box.
CLOSE_WITHIN_S = max(FAST_TIMEOUTS.handshake_s, FAST_TIMEOUTS.idle_s) + 5.0
# The destination daemon's resident memory must stay under this.  Idle it
# holds ~50-70 MiB (Python, numpy, uvloop, cryptography); a receive is
# bounded by the wire's RECEIVE_BUFFER_LIMIT (~18 MiB) plus 4 MiB batches;
# a legitimate migration runs alongside.  256 MiB leaves room for those and
# catches anything that scales with what peers declare or with how many
# sessions came and went.
RSS_LIMIT_KIB = 256 * 1024
# What one attack may add to it (the legitimate migrations running at the
# same time included): a session holds at most the wire's receive buffer
# (2 x 9 MiB) and a batch; anything proportional to a *declared* size (a
# 4 GiB length, a mapping spanning the address space) would blow this.
ATTACK_RSS_GROWTH_KIB = 64 * 1024
