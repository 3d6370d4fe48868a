"""The source side of a withdrawal (SPEC.md 9.2), over one connection.

A migration whose source sent Release but never read Released is in
doubt: the destination may have published the image while the source,
having given up, runs its process again.  The source resolves it by
asking the destination, over a fresh connection, to withdraw the image:

    Hello(migration id of the failed migration) -> Welcome
    Withdraw(image_id)                          -> Withdrawn(image_id, outcome)

``outcome`` is "removed" (it had been published) or "absent" (it was not,
and now never will be).  Either way there is one copy again: the source's.
"""

from __future__ import annotations

import itertools
import time

from migrated.engine.transport import BlockingTransport, Channel, TransportTimeout, WaitExpired
from migrated.errors import MigratedError
from migrated.wire import events as ev
from migrated.wire import limits as L
from migrated.wire.connection import NEED_DATA, SourceConnection


class WithdrawRefused(MigratedError):
    """The destination answered with an error retrying will not change."""


# Error codes after which the same request can only be refused again.
FINAL_CODES = frozenset({"auth", "out-of-state", "malformed", "unsupported", "version",
                         "too-large"})


def request_withdraw(transport: BlockingTransport, *, node: str, migration_id: str,
                     image_id: str, timeout: float) -> str:
    """Run the withdrawal conversation; return the outcome.  Raises
    WithdrawRefused when the destination refuses, other MigratedErrors
    (transport, protocol) when the link fails: then try again later."""
    seq = itertools.count()
    ch = Channel(SourceConnection(), transport, NEED_DATA, lambda: ev.Keepalive(next(seq)))
    peer = transport.peer
    ch.send_event(ev.Hello(L.SUPPORTED_VERSIONS, node, (), migration_id))
    _expect(ch, ev.Welcome, timeout, peer)
    ch.send_event(ev.Withdraw(image_id))
    got = _expect(ch, ev.Withdrawn, timeout, peer)
    return got.outcome


def _expect(ch: Channel, want: type, timeout: float, peer: str):
    """The answer ``want`` within ``timeout`` in all: keepalives do not
    restart it (one every few seconds would keep us waiting for ever, and
    the in-doubt image would never be withdrawn)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransportTimeout(peer, f"{peer} did not answer the withdrawal "
                                         f"({want.__name__}) within {timeout:g} s")
        try:
            got = ch.next_event(left)
        except WaitExpired:
            continue                       # (said above, in our words)
        if isinstance(got, ev.Keepalive):
            continue
        if isinstance(got, want):
            return got
        if isinstance(got, ev.Error):
            cls = WithdrawRefused if got.code in FINAL_CODES else MigratedError
            raise cls(f"{peer} refused the withdrawal ({got.code}): {got.message}")
        if isinstance(got, ev.Cancel):
            raise WithdrawRefused(f"{peer} cancelled the withdrawal: {got.reason}")
        raise MigratedError(f"{peer} answered the withdrawal with {type(got).__name__}")
