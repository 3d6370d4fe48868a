"""Who does the work in how many threads.  The source: a reader thread
reads ahead of the sending thread, or (big live rounds over plain TCP) the
sending thread reads itself, one buffer at a time.  The destination: pages
are written by a second thread unless they come over TLS from a source on
the same machine.  Every way must give the same pages and an exact image."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from migrated.engine import source
from migrated.engine.source import INLINE_READ_BYTES, READ_BUFFER_BYTES, SendOptions, _Pipeline
from migrated.engine.transport import BlockingTransport
from migrated.image.store import ImageStore
from migrated.kernel.reader import MemReader
from migrated.runs import PAGE_SIZE, PageRuns
from tests.engine.harness import migrate
from tests.engine.imagecheck import compare
from tests.engine.procs import workload
from tests.engine.tlspair import tcp_pair, tls_pair

MIB = 1024 * 1024


def _memory(pid: int, runs: PageRuns) -> bytes:
    """The bytes of ``runs`` read straight from /proc/PID/mem."""
    out = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        for start, n in runs.pairs():
            f.seek(start)
            out.append(f.read(n * PAGE_SIZE))
    return b"".join(out)


def _drain(pid: int, runs: PageRuns, read_ahead: bool, nreaders: int) -> tuple[list, set]:
    """Every item of a pipeline over ``runs``, its data copied out at once
    (a buffer is reused after the next item), and the threads that read."""
    readers = [MemReader(pid, buffer_bytes=MIB) for _ in range(nreaders)]
    readers_seen: set[int] = set()
    pipe = _Pipeline(readers, runs, readers[0].buffer_pages,
                     lambda r, d: readers_seen.add(threading.get_ident()), read_ahead=read_ahead)
    items = []
    try:
        for it in pipe:
            items.append((it.runs, it.failed, it.zero_runs, it.data_runs, bytes(it.data)))
    finally:
        pipe.close()
    return items, readers_seen


def test_reading_inline_or_ahead_hands_over_the_same_pages():
    with workload(mib=6, zero_mib=1) as w:
        runs = PageRuns.from_pairs([(w.addr, w.mib * MIB // PAGE_SIZE),
                                    (w.zero_addr, w.zero_mib * MIB // PAGE_SIZE)])
        before = threading.active_count()
        inline, inline_readers = _drain(w.pid, runs, read_ahead=False, nreaders=1)
        assert threading.active_count() == before            # no thread was started
        ahead, ahead_readers = _drain(w.pid, runs, read_ahead=True, nreaders=2)

        assert inline == ahead
        assert len(inline) > 3                                # several buffers' worth
        assert inline_readers == {threading.get_ident()}      # read by the consumer
        assert threading.get_ident() not in ahead_readers     # read by the helper
        got = PageRuns.concat([it[0] for it in inline])
        assert got == runs
        zeros = PageRuns.concat([it[2] for it in inline if it[2]])
        assert zeros.total_pages() == w.zero_mib * MIB // PAGE_SIZE
        for _, _, _, data_runs, data in inline:               # exactly the target's bytes
            if data_runs:
                assert data == _memory(w.pid, data_runs)


def test_closing_an_inline_pipeline_midway_stops_reading():
    with workload(mib=4) as w:
        runs = PageRuns.from_pairs([(w.addr, w.mib * MIB // PAGE_SIZE)])
        reader = MemReader(w.pid, buffer_bytes=MIB)
        pipe = _Pipeline([reader], runs, reader.buffer_pages, lambda r, d: None,
                         read_ahead=False)
        next(pipe)
        read = reader.bytes_read
        pipe.close()
        with pytest.raises(StopIteration):
            next(pipe)
        assert reader.bytes_read == read


@pytest.mark.parametrize("link, tls", [(tcp_pair, False), (tls_pair, True)])
@pytest.mark.parametrize("write_inline", [None, False])
def test_the_link_and_the_round_decide_who_reads(tmp_path, monkeypatch, link, tls,
                                                 write_inline):
    """Over plain TCP a live round of at least INLINE_MIN_ROUND_BYTES is
    read in the sending thread; smaller ones, the frozen delta and every
    round over TLS are read ahead.  The image is exact either way."""
    store = ImageStore(str(tmp_path / "state"))
    monkeypatch.setattr(source, "INLINE_MIN_ROUND_BYTES", 8 * MIB)
    rounds = []                             # (bytes, read ahead?) per round read

    class Watched(source._Pipeline):
        def __init__(self, readers, runs, piece_pages, on_read, *, read_ahead=True):
            rounds.append((runs.total_pages() * PAGE_SIZE, read_ahead))
            super().__init__(readers, runs, piece_pages, on_read, read_ahead=read_ahead)

    monkeypatch.setattr(source, "_Pipeline", Watched)
    seen = {}

    def note(sm, e):
        seen.update(buffers=[r.buffer_pages * PAGE_SIZE for r in sm._readers])

    with workload(mib=24, rate=3000, zero_mib=2) as w:
        try:
            out = migrate(w.pid, store, SendOptions(then="stop"), sockets=link(),
                          on_event=note, write_inline=write_inline)
            assert out.source["status"] == "completed", out.source.get("error")
            compare(store, out.source["image_id"], w.pid)
        finally:
            os.kill(w.pid, 18)      # SIGCONT: then=stop left it stopped
    assert seen["buffers"] == [READ_BUFFER_BYTES if tls else INLINE_READ_BYTES] * 2
    assert len(rounds) >= 3 and rounds[0][0] >= 24 * MIB
    live, frozen = rounds[:-1], rounds[-1]
    for nbytes, ahead in live:
        assert ahead is (tls or nbytes < 8 * MIB), (nbytes, ahead)
    assert any(n < 8 * MIB for n, _ in live)        # both kinds of live round seen
    assert frozen[1] is True
    # Loopback is this machine: over TLS pages are written where they were
    # received, unless told otherwise; over TCP the writer thread stays.
    assert out.dest["write_inline"] is (write_inline is None and tls)


def test_a_peer_is_on_this_machine_over_loopback_or_a_unix_socket():
    for make in (tcp_pair, tls_pair, socket.socketpair):
        a, b = make()
        try:
            assert BlockingTransport(a).same_host and BlockingTransport(b).same_host
        finally:
            a.close()
            b.close()
    # A connection from our own address to itself is local too, loopback or not.
    addrs = [a for a in _local_ipv4() if not a.startswith("127.")]
    if not addrs:
        pytest.skip("no non-loopback address here")
    ls = socket.create_server((addrs[0], 0))
    try:
        c = socket.create_connection(ls.getsockname())
        s, _ = ls.accept()
        assert BlockingTransport(c).same_host and BlockingTransport(s).same_host
        c.close()
        s.close()
    finally:
        ls.close()


def _local_ipv4() -> list[str]:
    import subprocess
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]
