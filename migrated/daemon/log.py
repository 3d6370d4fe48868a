"""One line per event, key=value (journald friendly) or JSON.

Every line carries ``event=`` and ``mid=`` (the migration id, ``-`` for
lines about the daemon itself), so ``journalctl -u migrated | grep
mid=abc`` shows one migration from start to end.  Worker threads log too:
writes are serialised by a lock and flushed per line.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from typing import IO, Any

# Values made only of these characters are written bare in kv lines;
# anything else is quoted with JSON string escaping (so a peer-supplied
# string can never forge a second key or a second line).
_BARE = re.compile(r"[A-Za-z0-9_.:/@+\-,\[\]]+")
# A log line never grows beyond this: an error message from a peer or the
# kernel is cut, not copied whole into the journal.
MAX_VALUE_CHARS = 2000


def _kv_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".") if v == v else "nan"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple, dict)):
        s = json.dumps(v, separators=(",", ":"), default=str)
    else:
        s = str(v)
    if len(s) > MAX_VALUE_CHARS:
        s = s[:MAX_VALUE_CHARS] + "..."
    return s if _BARE.fullmatch(s) else json.dumps(s)


def format_kv(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={_kv_value(v)}" for k, v in fields.items())


def format_json(fields: dict[str, Any]) -> str:
    def clip(v: Any) -> Any:
        if isinstance(v, str) and len(v) > MAX_VALUE_CHARS:
            return v[:MAX_VALUE_CHARS] + "..."
        return v
    return json.dumps({k: clip(v) for k, v in fields.items()},
                      separators=(",", ":"), default=str)


class EventLog:
    def __init__(self, fmt: str = "kv", stream: IO[str] | None = None, node: str = ""):
        if fmt not in ("kv", "json"):
            raise ValueError(f"unknown log format {fmt!r}")
        self.fmt = fmt
        self.stream = stream if stream is not None else sys.stderr
        self.node = node
        self._lock = threading.Lock()

    def line(self, event: str, mid: str | None = None, level: str = "info",
             **fields: Any) -> str:
        now = time.time()
        head: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
                  + f".{int(now * 1000) % 1000:03d}Z",
            "level": level,
            "event": event,
            "mid": mid or "-",
        }
        # None means "not known": left out rather than printed as a placeholder.
        head.update((k, v) for k, v in fields.items() if k not in head and v is not None)
        text = format_json(head) if self.fmt == "json" else format_kv(head)
        with self._lock:
            try:
                self.stream.write(text + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed stderr must never take a migration down
        return text

    def info(self, event: str, mid: str | None = None, **fields: Any) -> str:
        return self.line(event, mid, "info", **fields)

    def warning(self, event: str, mid: str | None = None, **fields: Any) -> str:
        return self.line(event, mid, "warning", **fields)

    def error(self, event: str, mid: str | None = None, **fields: Any) -> str:
        return self.line(event, mid, "error", **fields)

    def migration_event(self, ev: dict[str, Any], role: str) -> str:
        """Log an engine event dict ({"event": ..., "migration_id": ...})."""
        fields = {k: v for k, v in ev.items() if k not in ("event", "migration_id", "role",
                                                           "ts", "level", "mid")}
        # Per-round lists would turn one line into a page; they are in status.
        fields.pop("rounds", None)
        level = "error" if ev.get("status") == "failed" else "info"
        return self.line(str(ev.get("event", "?")), ev.get("migration_id") or None,
                         level, role=role, **fields)
