"""The whole transition table, enumerated: for each role under test, each
state, each message type and each sender, the message is accepted (and
leads where TRANSITIONS says) or refused (and changes nothing)."""

from __future__ import annotations

import itertools

import pytest

from migrated.errors import ProtocolError
from migrated.runs import PageRuns
from migrated.wire import (MESSAGE_TYPES, NEED_DATA, TRANSITIONS, Backlog, Cancel,
                           CommitRequest, Committed, DestConnection, Dropped,
                           Error, FinalEnd, Freeze, Hello, Keepalive, Layout,
                           LocalProtocolError, Pages, Release, Released, Role,
                           RoundEnd, SourceConnection, State, Welcome, Withdraw,
                           Withdrawn, Zeros, encode, limits)

from .helpers import ACCEPT, BASE, HELLO, LAYOUT, START, WELCOME

S, D = Role.SOURCE, Role.DEST
# The handshake negotiates "backlog" (a destination message that needs it)
# and one round ends before the states after STREAMING, so that every
# message of the table, Backlog included, can be legal where it says.
HELLO_B = Hello(HELLO.versions, HELLO.node, HELLO.capabilities + ("backlog",),
                HELLO.migration_id)
WELCOME_B = Welcome(WELCOME.version, WELCOME.node, ("backlog",))
SAMPLE = {
    "hello": HELLO_B, "welcome": WELCOME_B, "start": START, "accept": ACCEPT,
    "layout": Layout(1, LAYOUT.mappings),
    "pages": Pages.build(1, PageRuns.from_pairs([(BASE, 1)]), b"\x5a" * 4096),
    "zeros": Zeros(1, PageRuns.from_pairs([(BASE, 2)])),
    "dropped": Dropped(1, PageRuns.from_pairs([(BASE, 2)])),
    "round-end": RoundEnd(1, 0, 0, 0.0, 0.0, 0.0, 0.0),
    "freeze": Freeze(1), "final-end": FinalEnd(1, 0),
    "commit-request": CommitRequest(0), "committed": Committed("img-1", "d"),
    "release": Release("img-1"), "released": Released("img-1"),
    "withdraw": Withdraw("img-1"), "withdrawn": Withdrawn("img-1", "removed"),
    "error": Error("internal", "boom"), "cancel": Cancel("stop"),
    "keepalive": Keepalive(1), "backlog": Backlog(0, 64 << 20, 150.0),
}
HAPPY = [(S, HELLO_B), (D, WELCOME_B), (S, START), (D, ACCEPT), (S, LAYOUT),
         (S, RoundEnd(0, 0, 0, 0.0, 0.0, 0.0, 0.0)),
         (S, Freeze(1)), (S, FinalEnd(1, 0)), (S, CommitRequest(0)),
         (D, Committed("img-1", "d")), (S, Release("img-1")), (D, Released("img-1"))]
PATHS = {
    State.IDLE: 0, State.HELLO_SENT: 1, State.WELCOMED: 2, State.START_SENT: 3,
    State.STREAMING: 6, State.FROZEN: 7, State.FINAL_SENT: 8,
    State.COMMIT_SENT: 9, State.COMMITTED: 10, State.RELEASE_SENT: 11, State.DONE: 12,
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
    assert len(CASES) == 2 * 14 * 21 * 2
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


@pytest.mark.parametrize("role", [S, D])
def test_backlog_needs_its_capability_and_a_round_that_ended(role):
    """Without "backlog" in welcome, a Backlog is out of state (refused from
    the peer, LocalProtocolError for our own); with it, only after the
    round-end of the round it names."""
    d = Driver(role)
    for sender, ev in [(S, HELLO), (D, WELCOME), (S, START), (D, ACCEPT), (S, LAYOUT),
                       (S, RoundEnd(0, 0, 0, 0.0, 0.0, 0.0, 0.0))]:
        d.apply(sender, ev)
    late = Backlog(0, 1, 1.0)
    if role is D:
        with pytest.raises(LocalProtocolError):
            d.conn.send(late)
        assert d.conn.state is State.STREAMING
    else:
        d.conn.receive_data(d.peer_bytes(late))
        with pytest.raises(ProtocolError) as exc:
            d.conn.next_event()
        assert exc.value.code == "out-of-state" and "capability" in exc.value.message
    d = reach(role, State.STREAMING)
    early = Backlog(1, 1, 1.0)          # round 1 has not ended
    if role is D:
        with pytest.raises(LocalProtocolError):
            d.conn.send(early)
        d.conn.send(Backlog(0, 1, 1.0))
    else:
        d.conn.receive_data(d.peer_bytes(early))
        with pytest.raises(ProtocolError) as exc:
            d.conn.next_event()
        assert exc.value.code == "out-of-state"
