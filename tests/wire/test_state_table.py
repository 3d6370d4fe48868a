"""The whole transition table, enumerated: for each role under test, each
state, each message type and each sender, the message is accepted (and
leads where TRANSITIONS says) or refused (and changes nothing)."""

from __future__ import annotations

import itertools

import pytest

from migrated.errors import ProtocolError
from migrated.runs import PageRuns
from migrated.wire import (MESSAGE_TYPES, NEED_DATA, TRANSITIONS, Cancel,
                           CommitRequest, Committed, DestConnection, Dropped,
                           Error, FinalEnd, Freeze, Keepalive,
                           LocalProtocolError, Pages, Release, Released, Role,
                           RoundEnd, SourceConnection, State, Withdraw, Withdrawn,
                           Zeros, encode, limits)

from .helpers import ACCEPT, BASE, HELLO, LAYOUT, START, WELCOME

S, D = Role.SOURCE, Role.DEST
SAMPLE = {
    "hello": HELLO, "welcome": WELCOME, "start": START, "accept": ACCEPT,
    "layout": LAYOUT,
    "pages": Pages.build(0, PageRuns.from_pairs([(BASE, 1)]), b"\x5a" * 4096),
    "zeros": Zeros(0, PageRuns.from_pairs([(BASE, 2)])),
    "dropped": Dropped(0, PageRuns.from_pairs([(BASE, 2)])),
    "round-end": RoundEnd(0, 0, 0, 0.0, 0.0, 0.0, 0.0),
    "freeze": Freeze(0), "final-end": FinalEnd(0, 0),
    "commit-request": CommitRequest(0), "committed": Committed("img-1", "d"),
    "release": Release("img-1"), "released": Released("img-1"),
    "withdraw": Withdraw("img-1"), "withdrawn": Withdrawn("img-1", "removed"),
    "error": Error("internal", "boom"), "cancel": Cancel("stop"),
    "keepalive": Keepalive(1),
}
HAPPY = [(S, HELLO), (D, WELCOME), (S, START), (D, ACCEPT), (S, LAYOUT),
         (S, Freeze(0)), (S, FinalEnd(0, 0)), (S, CommitRequest(0)),
         (D, Committed("img-1", "d")), (S, Release("img-1")), (D, Released("img-1"))]
PATHS = {
    State.IDLE: 0, State.HELLO_SENT: 1, State.WELCOMED: 2, State.START_SENT: 3,
    State.STREAMING: 5, State.FROZEN: 6, State.FINAL_SENT: 7,
    State.COMMIT_SENT: 8, State.COMMITTED: 9, State.RELEASE_SENT: 10, State.DONE: 11,
}


class Driver:
    def __init__(self, role: Role):
        self.role = role
        self.conn = SourceConnection() if role is S else DestConnection()
        self.peer_started = False

    def peer_bytes(self, ev) -> bytes:
        data = encode(ev)
        if not self.peer_started:
            self.peer_started = True
            data = limits.PREAMBLE + data
        return data

    def apply(self, sender: Role, ev):
        if sender is self.role:
            self.conn.send(ev)
            return ev
        self.conn.receive_data(self.peer_bytes(ev))
        got = self.conn.next_event()
        assert got == ev
        return got


def reach(role: Role, state: State) -> Driver:
    d = Driver(role)
    if state is State.CLOSED:
        for sender, ev in HAPPY[:5]:
            d.apply(sender, ev)
        d.apply(role.peer, Cancel("bye"))
    elif state is State.WITHDRAW_SENT:
        for sender, ev in HAPPY[:2] + [(S, Withdraw("img-1"))]:
            d.apply(sender, ev)
    elif state is State.ERROR:
        with pytest.raises(ProtocolError):
            d.conn.receive_data(b"garbage!")  # refused at once: bad preamble
    else:
        for sender, ev in HAPPY[:PATHS[state]]:
            d.apply(sender, ev)
    assert d.conn.state is state
    return d


CASES = list(itertools.product(Role, State, MESSAGE_TYPES, Role))


def _id(c):
    role, state, t, sender = c
    return f"{role.value}-{state.value}-{sender.value}-sends-{t.type_name}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_transition(case):
    role, state, etype, sender = case
    d = reach(role, state)
    ev = SAMPLE[etype.type_name]
    expected = TRANSITIONS.get((sender, state, etype))
    conn = d.conn
    if sender is role:
        if expected is None:
            with pytest.raises(LocalProtocolError):
                conn.send(ev)
            assert conn.state is state
        else:
            conn.send(ev)
            assert conn.state is expected
        return
    data = d.peer_bytes(ev)
    if state is State.ERROR:
        conn.receive_data(data)
        with pytest.raises(ProtocolError):
            conn.next_event()
        return
    if state is State.CLOSED:
        conn.receive_data(data)  # a closed connection decodes nothing more
        assert conn.next_event() is NEED_DATA
        assert conn.state is State.CLOSED
        return
    if expected is None:
        with pytest.raises(ProtocolError) as exc:
            conn.receive_data(data)
            conn.next_event()
        assert exc.value.code == "out-of-state"
        assert not isinstance(exc.value, LocalProtocolError)
        assert conn.state is State.ERROR
        # Only Error or Cancel may be sent now.
        with pytest.raises(LocalProtocolError):
            conn.send(Keepalive(9))
        conn.send(Error("out-of-state", "bye"))
        assert conn.state is State.CLOSED
    else:
        conn.receive_data(data)
        assert conn.next_event() == ev
        assert conn.state is expected


def test_table_shape():
    # The main path is a single line; each state but DONE/CLOSED/ERROR has
    # exactly one way forward on that line.
    for st in State:
        legal = {(r, t) for (r, s, t) in TRANSITIONS if s is st}
        if st is State.CLOSED:
            assert legal == set()
        else:
            assert (S, Error) in legal and (D, Error) in legal
    assert len(CASES) == 2 * 14 * 20 * 2
    # The three-way commit: prepared, then released, then done.
    assert TRANSITIONS[(D, State.COMMIT_SENT, Committed)] is State.COMMITTED
    assert TRANSITIONS[(S, State.COMMITTED, Release)] is State.RELEASE_SENT
    assert TRANSITIONS[(D, State.RELEASE_SENT, Released)] is State.DONE
    for st in (State.COMMITTED, State.RELEASE_SENT):
        for r in (S, D):
            assert TRANSITIONS[(r, st, Cancel)] is State.CLOSED
            assert TRANSITIONS[(r, st, Keepalive)] is st
    # A source's Cancel may cross Released (the destination then withdraws
    # the image); the destination itself has nothing to cancel once done.
    assert TRANSITIONS[(S, State.DONE, Cancel)] is State.CLOSED
    assert (D, State.DONE, Cancel) not in TRANSITIONS
    # Resolving a migration in doubt: Withdraw only right after Welcome.
    assert TRANSITIONS[(S, State.WELCOMED, Withdraw)] is State.WITHDRAW_SENT
    assert TRANSITIONS[(D, State.WITHDRAW_SENT, Withdrawn)] is State.DONE
    assert [st for (r, st, t) in TRANSITIONS if t is Withdraw] == [State.WELCOMED]


@pytest.mark.parametrize("role", [S, D])
def test_release_must_name_the_prepared_image(role):
    """Release/Released naming another image than Committed did is refused
    (out-of-state) by the receiver and by our own sender."""
    d = reach(role, State.COMMITTED)
    if role is S:
        with pytest.raises(LocalProtocolError):
            d.conn.send(Release("img-2"))
        assert d.conn.state is State.COMMITTED
        d.conn.send(Release("img-1"))
        d.conn.receive_data(d.peer_bytes(Released("img-9")))
        with pytest.raises(ProtocolError) as exc:
            d.conn.next_event()
    else:
        d.conn.receive_data(d.peer_bytes(Release("img-2")))
        with pytest.raises(ProtocolError) as exc:
            d.conn.next_event()
    assert exc.value.code == "out-of-state"
    assert d.conn.state is State.ERROR
