"""PipelinedWriter: same image as the plain writer, errors surface in the
caller's thread with their own type, and no thread is left behind."""

from __future__ import annotations

import threading

import pytest

from migrated.image import LayoutViolation
from migrated.image.pipeline import PipelinedWriter
from migrated.runs import PAGE_SIZE

from .conftest import mapping, runs, write_pattern

META = {"pid": 1, "cmdline": ["x"], "exe": "/bin/x", "source_node": "a", "migration_id": "m"}
BASE = 0x7f0000000000


def _build(writer) -> None:
    writer.set_layout([mapping(BASE, 2048)])
    for i in range(8):
        buf = bytearray(write_pattern_bytes(i))
        # A reused caller buffer: the wrapper must keep its own copy.
        writer.write_pages(runs(BASE + i * 256 * PAGE_SIZE, 256), memoryview(buf))
        buf[:] = b"\xff" * len(buf)
        writer.checkpoint()
    writer.write_zeros(runs(BASE + 2047 * PAGE_SIZE, 1))
    writer.drop(runs(BASE, 3))


def write_pattern_bytes(seed: int) -> bytes:
    from tests.target import expected
    return expected(BASE + seed * 256 * PAGE_SIZE, 256, seed)


def test_same_image_as_plain_writer(store):
    plain = store.begin(META)
    _build(plain)
    id1, _ = plain.commit({})
    piped = PipelinedWriter(store.begin(META))
    _build(piped)
    image_id, _ = piped.commit({})
    assert store.verify(image_id).ok
    span = 2048 * PAGE_SIZE
    assert store.read_memory(image_id, BASE, span) == store.read_memory(id1, BASE, span)
    m1, m2 = store.show(id1), store.show(image_id)
    assert m1["mappings"] == m2["mappings"]
    got = store.read_memory(image_id, BASE + 3 * PAGE_SIZE, 253 * PAGE_SIZE)
    assert got == write_pattern_bytes(0)[3 * PAGE_SIZE:]
    assert not piped._thread.is_alive()


def test_error_raised_in_caller_with_its_type_then_abort(store):
    before = threading.active_count()
    w = PipelinedWriter(store.begin(META))
    w.set_layout([mapping(BASE, 16)])
    write_pattern(w, BASE, 4, 1)
    # Outside the layout: fails in the worker, surfaces on a later call.
    w.write_pages(runs(BASE + 64 * PAGE_SIZE, 1), b"\0" * PAGE_SIZE)
    with pytest.raises(LayoutViolation):
        w.drain()
    with pytest.raises(LayoutViolation):
        w.write_zeros(runs(BASE, 1))
    w.abort()
    assert store.list() == []
    import os
    assert os.listdir(store.partial_dir) == []
    assert threading.active_count() == before


def test_handed_over_batches_are_written_without_a_copy_and_given_back(store):
    # The destination's receive buffers: written from where they are (no
    # pooled copy is made) and given back to the reader once on disk.
    from migrated.wire.frames import ReceiveBuffer
    w = PipelinedWriter(store.begin(META))
    w.set_layout([mapping(BASE, 2048)])
    bufs = []
    for i in range(8):
        data = write_pattern_bytes(i)
        buf = ReceiveBuffer(len(data) + 100)
        buf[:len(data)] = data
        buf.handed = True
        bufs.append(buf)
        w.write_pages(runs(BASE + i * 256 * PAGE_SIZE, 256), memoryview(buf)[:len(data)])
    w.drain()
    assert w._pool_made == 0                    # never copied
    assert not any(b.handed for b in bufs)      # all given back
    image_id, _ = w.commit({})
    assert store.verify(image_id).ok
    for i in range(8):
        got = store.read_memory(image_id, BASE + i * 256 * PAGE_SIZE, 256 * PAGE_SIZE)
        assert got == write_pattern_bytes(i)


def test_handed_over_buffer_is_given_back_when_the_write_fails(store):
    from migrated.wire.frames import ReceiveBuffer
    w = PipelinedWriter(store.begin(META))
    w.set_layout([mapping(BASE, 16)])
    buf = ReceiveBuffer(PAGE_SIZE)
    buf.handed = True
    w.write_pages(runs(BASE + 64 * PAGE_SIZE, 1), memoryview(buf))   # outside the layout
    with pytest.raises(LayoutViolation):
        w.drain()
    assert not buf.handed
    w.abort()


class _InPlace:
    """Page data that puts itself in place (as DeferredData does from a
    socket): records the stretches and what the writer's queue held."""

    def __init__(self, data: bytes, pipelined: PipelinedWriter):
        self.data, self.nbytes, self.pipelined = data, len(data), pipelined
        self.stretches: list = []
        self.queued_when_filled: int | None = None
        self.thread: str | None = None

    def fill_into(self, fd: int, stretches) -> None:
        import os
        self.queued_when_filled = self.pipelined._q.unfinished_tasks
        self.thread = threading.current_thread().name
        for off, a, b in stretches:
            os.pwrite(fd, self.data[a:b], off)
        self.stretches = list(stretches)


def test_data_that_fills_itself_in_is_written_in_order_in_the_callers_thread(store):
    w = PipelinedWriter(store.begin(META))
    w.set_layout([mapping(BASE, 2048)])
    # Queued work first (a whole chunk, then a drop inside it), then a batch
    # that rewrites the dropped pages in place itself: it must see the queue
    # empty, so the drop cannot land after it and punch its pages out.
    write_pattern(w, BASE, 512, 1)
    w.drop(runs(BASE + 10 * PAGE_SIZE, 100))
    new = bytes(range(256)) * (16 * 600)
    src = _InPlace(new, w)
    w.write_pages(runs(BASE + 10 * PAGE_SIZE, 600), src)
    assert src.queued_when_filled == 0
    assert src.thread == threading.current_thread().name
    # 600 pages from page 10 cross into a new chunk, whose slot comes next
    # in the file: one stretch.
    assert src.stretches == [(10 * PAGE_SIZE, 0, 600 * PAGE_SIZE)]
    image_id, _ = w.commit({})
    assert store.verify(image_id).ok
    assert store.read_memory(image_id, BASE + 10 * PAGE_SIZE, 600 * PAGE_SIZE) == new
    assert store.read_memory(image_id, BASE, 10 * PAGE_SIZE) == \
        expected_pattern(BASE, 10, 1)


def expected_pattern(start: int, npages: int, seed: int) -> bytes:
    from tests.target import expected
    return expected(start, npages, seed)
