"""Events as plain JSON-able dicts (test vectors, logs, debugging).

bytes become lowercase hex strings, PageRuns a list of [address, count]
pairs, mappings a list of dicts.  Not used on the wire.
"""

from __future__ import annotations

import dataclasses

from migrated.runs import PageRuns

from . import events as E

_BYTES_FIELDS = {"data", "digest"}


# Optional fields left out of the JSON form when absent (a capability's
# additions), so that the vectors written before them stay as they were.
_OMIT_WHEN_ABSENT = {("final-end", "dirty_rate"), ("final-end", "pause_ms")}


def event_to_json(ev) -> dict:
    if isinstance(ev, E.ConnectionClosed):
        return {"type": "connection-closed", "clean": ev.clean}
    out = {"type": ev.type_name}
    for f in dataclasses.fields(ev):
        v = getattr(ev, f.name)
        if v is None and (ev.type_name, f.name) in _OMIT_WHEN_ABSENT:
            continue
        if isinstance(v, PageRuns):
            v = [list(p) for p in v.pairs()]
        elif isinstance(v, (bytes, bytearray, memoryview)):
            v = bytes(v).hex()
        elif f.name == "mappings":
            v = [dataclasses.asdict(m) for m in v]
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, dict):
            v = dict(v)
        out[f.name] = v
    return out


def event_from_json(d: dict):
    d = dict(d)
    t = d.pop("type")
    if t == "connection-closed":
        return E.ConnectionClosed(**d)
    cls = E.BY_NAME[t]
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        if f.name == "runs":
            v = PageRuns.from_pairs([tuple(p) for p in v]) if v else PageRuns.empty()
        elif f.name in _BYTES_FIELDS and isinstance(v, str) and t != "committed":
            v = bytes.fromhex(v)
        elif f.name == "mappings":
            v = tuple(E.MappingInfo(**m) for m in v)
        kw[f.name] = v
    return cls(**kw)
