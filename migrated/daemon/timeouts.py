"""The daemon's peer timeouts, set once at start from the config.

Three settings cover every wait on a peer:

- ``peer-timeout`` (default 30 s): the silence tolerated on a migration
  connection -- between messages, and for one send or receive.  Keepalives
  go out every ``min(5 s, peer-timeout / 6)`` while a side is busy, and the
  kernel's TCP_USER_TIMEOUT and keepalive probes follow it too, so a dead
  link is noticed on the same scale.
- ``handshake-timeout`` (default 10 s): TCP connect, the TLS handshake and
  Hello..Accept, together.
- ``commit-timeout`` (default 120 s): CommitRequest -> Committed (the
  destination verifies and fsyncs the image) and Release -> Released.

They are process-wide module settings (the engine reads them when a
migration starts), so only what the operator set is applied; the built-in
values stay otherwise.  Both ends should agree: a destination derives its
publish window from its own values (SPEC.md 9.1, 14).
"""

from __future__ import annotations

from migrated.daemon import manager, tls
from migrated.wire import limits as L

# Keepalives: at least six per tolerated silence, never rarer than this.
MAX_KEEPALIVE_S = 5.0


def apply(peer_timeout: float | None = None, handshake_timeout: float | None = None,
          commit_timeout: float | None = None) -> dict:
    """Set the timeouts given (seconds); returns the values now in force."""
    if peer_timeout is not None:
        t = float(peer_timeout)
        L.IDLE_TIMEOUT_S = t
        manager.IO_TIMEOUT_S = t
        L.KEEPALIVE_INTERVAL_S = min(MAX_KEEPALIVE_S, t / 6.0)
        tls.TCP_USER_TIMEOUT_MS = int(t * 1000)
        tls.KEEPALIVE_IDLE_S = max(1, int(t / 3))
        tls.KEEPALIVE_INTERVAL_S = max(1, int(t / 6))
    if handshake_timeout is not None:
        t = float(handshake_timeout)
        L.HANDSHAKE_TIMEOUT_S = t
        tls.HANDSHAKE_TIMEOUT_S = t
        tls.CONNECT_TIMEOUT_S = t
    if commit_timeout is not None:
        L.COMMIT_TIMEOUT_S = float(commit_timeout)
    return current()


def current() -> dict:
    return {"peer_timeout_s": L.IDLE_TIMEOUT_S, "handshake_timeout_s": L.HANDSHAKE_TIMEOUT_S,
            "commit_timeout_s": L.COMMIT_TIMEOUT_S,
            "keepalive_s": round(L.KEEPALIVE_INTERVAL_S, 3)}
