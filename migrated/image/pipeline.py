"""PipelinedWriter: an ImageWriter whose page writes run in a second thread.

The destination's receive loop spends about as long in the socket read as
in the pwrite of the pages into the image file; both release the GIL.  This
wrapper queues the mutating calls (pages, zeros, drops, layout changes,
checkpoints) to one worker thread, in order, so that the next batch is read
from the network while the last one is written.  Everything else (commit,
prepare, publish, abort, totals ...) first waits until the queue is empty,
so callers see exactly the semantics of the wrapped writer.

Page data is not copied when it comes in a receive buffer handed over by
the wire layer (``migrated.wire.frames.handed_over``): the worker writes
it from there and gives the buffer back.  Anything else (bytes, a lent
view the caller will reuse) is first copied into a pooled buffer.

Page data still in the socket (an object with ``fill_into``, see
``ImageWriter.write_pages``) is written in the caller's thread once the
queue is empty: its bytes must leave the socket before the next message
can be read, and after every earlier change to the image.

A layout change is likewise applied in the caller's thread once the queue
is empty, never queued (it may be tens of MiB as records).

Memory stays bounded: at most ``MAX_QUEUED`` calls wait, each holding at
most one protocol batch (4 MiB).  The first error in the worker is kept and
raised, with its own type, from the next call in the caller's thread; later
queued work is dropped.
"""

from __future__ import annotations

import mmap
import queue
from typing import Any

from migrated.threads import Thread
from migrated.wire.frames import ReceiveBuffer, handed_over

# Four batches of at most 4 MiB: enough to ride over a slow pwrite without
# letting a fast sender pile up more than 16 MiB in the destination.
MAX_QUEUED = 4

# Copies of page data go into reused, pre-faulted buffers: a fresh 4 MiB
# bytes object per batch costs more in page faults than the copy itself.
# One more than can wait, plus the one being written.
POOL_BUFFERS = MAX_QUEUED + 2

_QUEUED = frozenset({"write_pages", "write_zeros", "drop", "set_layout",
                     "checkpoint", "flush_async"})
# After these the writer takes no more page data: the worker can go.
_FINAL = frozenset({"commit", "publish"})
_STOP = object()
# Pool buffers are at least one protocol batch (4 MiB) long.
BATCH_BYTES_HINT = 4 << 20


class PipelinedWriter:
    def __init__(self, writer: Any):
        self._w = writer
        self._q: queue.Queue = queue.Queue(MAX_QUEUED)
        self._error: BaseException | None = None
        self._free: queue.Queue = queue.Queue()
        self._pool_made = 0
        self._thread = Thread(target=self._run, daemon=True,
                              name=f"image-writer-{getattr(writer, 'image_id', '')}")
        self._thread.start()

    # -- worker -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is _STOP:
                    return
                name, args, kwargs = item
                try:
                    if self._error is None:
                        call = args[:2] if name == "write_pages" else args
                        getattr(self._w, name)(*call, **kwargs)
                finally:
                    if name == "write_pages":
                        self._recycle(args[2])
            except BaseException as exc:   # noqa: BLE001 -- handed to the caller
                self._error = exc
            finally:
                self._q.task_done()

    # -- caller side ----------------------------------------------------------

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def raise_pending(self) -> None:
        """Raise the worker's error now, if it hit one, without waiting for
        the queue: the caller need not make another writer call to learn
        that the image already failed (a peer sending only keepalives)."""
        self._raise_pending()

    def drain(self) -> None:
        """Wait until every queued call ran; raise the first error."""
        self._q.join()
        self._raise_pending()

    def _enqueue(self, name: str, args: tuple, kwargs: dict) -> None:
        self._raise_pending()
        if name == "write_pages":
            runs, data = args
            if hasattr(data, "fill_into"):
                self.drain()
                self._w.write_pages(runs, data)
                return
            owner = handed_over(data)
            if owner is not None:
                # A receive buffer handed over to us: written from where it
                # is, given back to the reader once written.
                args = (runs, data, owner)
            else:
                # The caller may reuse its buffer (a borrowed receive
                # buffer): the worker writes from a private pooled copy.
                view = memoryview(data).cast("B")
                buf = self._buffer(view.nbytes)
                buf[:view.nbytes] = view
                args = (runs, memoryview(buf)[:view.nbytes], buf)
        elif name == "set_layout":
            # Applied here once the queue is empty, never queued: a layout
            # may be 65536 mappings (some 60 MiB as records), and copies of
            # a few queued behind slow writes took ~300 MiB per session.
            # Layouts are rare (a round whose mappings changed), so the
            # overlap lost is nothing; the caller's iterable is consumed
            # before the call returns, as the plain writer does.
            self.drain()
            self._w.set_layout(*args, **kwargs)
            return
        self._q.put((name, args, kwargs))

    def _recycle(self, buf) -> None:
        if isinstance(buf, ReceiveBuffer):
            buf.give_back()
        else:
            self._free.put(buf)

    def _buffer(self, nbytes: int):
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            if self._pool_made < POOL_BUFFERS:
                self._pool_made += 1
                buf = None
            else:
                buf = self._free.get()
        if buf is None or len(buf) < nbytes:
            buf = mmap.mmap(-1, max(nbytes, BATCH_BYTES_HINT),
                            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return buf

    def close(self) -> None:
        """Stop the worker (after the queue empties).  Idempotent."""
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join()

    def abort(self) -> None:
        # Abort must work after any error: let queued work finish or fail,
        # then remove the partial image whatever happened.
        self._q.join()
        self.close()
        self._w.abort()

    def set_flush_listener(self, listener) -> None:
        """Straight to the writer: it orders no page work, and dropping the
        listener is cleanup that must work after the worker failed (the
        synced path would raise that failure again)."""
        self._w.set_flush_listener(listener)

    def __getattr__(self, name: str):
        attr = getattr(self._w, name)
        if name in _QUEUED:
            return lambda *args, **kwargs: self._enqueue(name, args, kwargs)
        if callable(attr):
            def synced(*args, **kwargs):
                self.drain()
                result = attr(*args, **kwargs)
                if name in _FINAL:
                    self.close()
                return result
            return synced
        return attr
