"""Wire protocol v1, sans-IO (see protocol/SPEC.md).

Bytes in, events out; events in, bytes out.  No sockets, no clock.
"""

from migrated.errors import ProtocolError

from . import limits
from .connection import (NEED_DATA, DestConnection, LocalProtocolError,
                         SourceConnection)
from .events import (ERROR_CODES, KINDS, MAP_FLAG_DELETED, MAP_FLAG_HEAP,
                     MAP_FLAG_STACK, MESSAGE_TYPES, MIGRATABLE_KINDS, Accept,
                     Backlog, Cancel, CommitRequest, Committed, ConnectionClosed,
                     Dropped, Error, Event, FinalEnd, Freeze, Hello,
                     Keepalive, Layout, MappingInfo, Pages, Release, Released,
                     RoundEnd, Start, WITHDRAW_OUTCOMES,
                     Welcome, Withdraw, Withdrawn, Zeros)
from .frames import decode_body, encode, encode_parts
from .state import TRANSITIONS, Role, State

__all__ = [
    "ProtocolError", "LocalProtocolError", "NEED_DATA", "SourceConnection",
    "DestConnection", "Role", "State", "TRANSITIONS", "limits", "Event",
    "Hello", "Welcome", "Start", "Accept", "Layout", "MappingInfo", "Pages",
    "Zeros", "Dropped", "RoundEnd", "Freeze", "FinalEnd", "CommitRequest",
    "Committed", "Release", "Released", "Withdraw", "Withdrawn", "WITHDRAW_OUTCOMES", "Error", "Cancel", "Keepalive", "Backlog", "ConnectionClosed",
    "MESSAGE_TYPES", "ERROR_CODES", "KINDS", "MIGRATABLE_KINDS",
    "MAP_FLAG_DELETED", "MAP_FLAG_HEAP", "MAP_FLAG_STACK", "encode",
    "encode_parts", "decode_body",
]
