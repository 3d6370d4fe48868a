"""The state machine of protocol v1: one table of legal transitions.

Both ends track the same conversation state.  A message is legal when
``(sender role, current state, message class)`` is a key of TRANSITIONS;
the value is the next state.  Everything else is refused: by send() as a
LocalProtocolError (our bug), by next_event() as ProtocolError
"out-of-state" (the peer's).

    IDLE --Hello(S)--> HELLO_SENT --Welcome(D)--> WELCOMED --Start(S)-->
    START_SENT --Accept(D)--> STREAMING --Freeze(S)--> FROZEN
    --FinalEnd(S)--> FINAL_SENT --CommitRequest(S)--> COMMIT_SENT
    --Committed(D)--> COMMITTED --Release(S)--> RELEASE_SENT
    --Released(D)--> DONE

or, to resolve a migration left in doubt (SPEC.md 9.2):

    IDLE --Hello(S)--> HELLO_SENT --Welcome(D)--> WELCOMED
    --Withdraw(S)--> WITHDRAW_SENT --Withdrawn(D)--> DONE

The commit is three-way: Committed means "prepared" (the image is durable
but staged, never visible), Release asks the destination to publish it,
Released confirms.  Neither side ends the conversation in doubt before
Release: a destination that never sees Release removes the staged image.

STREAMING loops on Layout/Pages/Zeros/Dropped/RoundEnd from the source,
FROZEN on Layout/Pages/Zeros/Dropped.  Error (either role) leads from any
state but CLOSED to CLOSED; Cancel (either role) from any state but DONE
and CLOSED (so also in COMMITTED and RELEASE_SENT: a source may still back
out after Committed, and the destination then removes the staged image),
and a source's Cancel also in DONE (it crossed Released on the wire).
Keepalive (either role) is legal and changes nothing in every
state but CLOSED and ERROR.  Backlog (destination, "backlog" capability
only -- the connection checks that) changes nothing either; it is legal
from STREAMING to COMMIT_SENT: the destination sends it while streaming,
and it may cross the source's Freeze, FinalEnd and CommitRequest.  ERROR is local: a connection enters it when
the peer broke the protocol, and then only sends Error or Cancel.
"""

from __future__ import annotations

import enum

from .events import (Accept, Backlog, Cancel, CommitRequest, Committed, Dropped, Error,
                     Event, FinalEnd, Freeze, Hello, Keepalive, Layout,
                     MESSAGE_TYPES, Pages, Release, Released, RoundEnd, Start,
                     Welcome, Withdraw, Withdrawn, Zeros)


class Role(enum.Enum):
    SOURCE = "source"
    DEST = "dest"

    @property
    def peer(self) -> "Role":
        return Role.DEST if self is Role.SOURCE else Role.SOURCE


class State(enum.Enum):
    IDLE = "IDLE"
    HELLO_SENT = "HELLO_SENT"
    WELCOMED = "WELCOMED"
    START_SENT = "START_SENT"
    STREAMING = "STREAMING"
    FROZEN = "FROZEN"
    FINAL_SENT = "FINAL_SENT"
    COMMIT_SENT = "COMMIT_SENT"
    COMMITTED = "COMMITTED"          # prepared at the destination, not visible
    RELEASE_SENT = "RELEASE_SENT"    # the source asked to publish: in doubt
    WITHDRAW_SENT = "WITHDRAW_SENT"  # resolving an in-doubt migration
    DONE = "DONE"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


S, D = Role.SOURCE, Role.DEST
St = State

_MAIN: dict[tuple[Role, State, type[Event]], State] = {
    (S, St.IDLE, Hello): St.HELLO_SENT,
    (D, St.HELLO_SENT, Welcome): St.WELCOMED,
    (S, St.WELCOMED, Start): St.START_SENT,
    (D, St.START_SENT, Accept): St.STREAMING,
    (S, St.STREAMING, Layout): St.STREAMING,
    (S, St.STREAMING, Pages): St.STREAMING,
    (S, St.STREAMING, Zeros): St.STREAMING,
    (S, St.STREAMING, Dropped): St.STREAMING,
    (S, St.STREAMING, RoundEnd): St.STREAMING,
    (S, St.STREAMING, Freeze): St.FROZEN,
    (S, St.FROZEN, Layout): St.FROZEN,
    (S, St.FROZEN, Pages): St.FROZEN,
    (S, St.FROZEN, Zeros): St.FROZEN,
    (S, St.FROZEN, Dropped): St.FROZEN,
    (S, St.FROZEN, FinalEnd): St.FINAL_SENT,
    (S, St.FINAL_SENT, CommitRequest): St.COMMIT_SENT,
    (D, St.COMMIT_SENT, Committed): St.COMMITTED,
    (S, St.COMMITTED, Release): St.RELEASE_SENT,
    (D, St.RELEASE_SENT, Released): St.DONE,
    (D, St.STREAMING, Backlog): St.STREAMING,
    (D, St.FROZEN, Backlog): St.FROZEN,
    (D, St.FINAL_SENT, Backlog): St.FINAL_SENT,
    (D, St.COMMIT_SENT, Backlog): St.COMMIT_SENT,
    # The other conversation: resolve a migration left in doubt.
    (S, St.WELCOMED, Withdraw): St.WITHDRAW_SENT,
    (D, St.WITHDRAW_SENT, Withdrawn): St.DONE,
}


def _build() -> dict[tuple[Role, State, type[Event]], State]:
    table = dict(_MAIN)
    for role in Role:
        for st in State:
            if st is not St.CLOSED:
                table[(role, st, Error)] = St.CLOSED
            if st not in (St.DONE, St.CLOSED):
                table[(role, st, Cancel)] = St.CLOSED
            if st not in (St.CLOSED, St.ERROR):
                table[(role, st, Keepalive)] = st
    # A source that cancels while waiting for Released: its Cancel crosses
    # the Released on the wire and reaches a destination already in DONE,
    # which then withdraws the image (SPEC.md 9.1).
    table[(S, St.DONE, Cancel)] = St.CLOSED
    return table


TRANSITIONS = _build()

# States in which only handshake messages (and Error/Cancel/Keepalive) move.
HANDSHAKE_STATES = frozenset({St.IDLE, St.HELLO_SENT, St.WELCOMED, St.START_SENT})


def next_state(sender: Role, state: State, event_type: type[Event]) -> State | None:
    """The state after ``sender`` sends an ``event_type`` in ``state``,
    or None if that is illegal."""
    return TRANSITIONS.get((sender, state, event_type))


def legal_types(sender: Role, state: State) -> tuple[type[Event], ...]:
    return tuple(t for t in MESSAGE_TYPES if (sender, state, t) in TRANSITIONS)
