"""Our threads carry their names to the kernel (top -H, ps -L, perf)."""

from __future__ import annotations

import threading

from migrated.threads import KERNEL_NAME_BYTES, Thread, kernel_name


def _comm(thread: threading.Thread) -> str:
    with open(f"/proc/self/task/{thread.native_id}/comm") as f:
        return f.read().rstrip("\n")


def test_kernel_names_are_short_and_keep_what_tells_threads_apart():
    assert kernel_name("migrated-reader") == "mig-reader"
    assert kernel_name("migrated-checkpoint") == "mig-checkpoint"
    assert kernel_name("image-writer-0123456789abcdef") == "mig-writer-0123"
    assert kernel_name("send-m-4f1c2d") == "send-m-4f1c2d"
    assert len(kernel_name("peer-[2001:db8::1]:7070")) == KERNEL_NAME_BYTES
    assert kernel_name("peer-\u00e9t\u00e9") == "peer-?t?"     # the kernel takes bytes


def _seen_while_running(make) -> str:
    """The kernel's name of a thread once its target runs (start() returns
    as soon as the thread exists, before run() has named it)."""
    go, running, seen = threading.Event(), threading.Event(), {}

    def target() -> None:
        running.set()
        go.wait(10)
    t = make(target)
    t.start()
    try:
        assert running.wait(10)
        seen["comm"] = _comm(t)
    finally:
        go.set()
        t.join(10)
    return seen["comm"]


def test_a_running_thread_is_named_in_proc():
    got = _seen_while_running(lambda fn: Thread(target=fn, name="migrated-flush", daemon=True))
    assert got == "mig-flush"


def test_a_plain_thread_is_not_which_is_why_we_name_ours():
    # What the kernel shows for a thread CPython started: its creator's
    # name.  If CPython ever names threads itself, this fails and the
    # module can go.
    got = _seen_while_running(lambda fn: threading.Thread(target=fn, name="plain-thread",
                                                          daemon=True))
    assert got != "plain-thread"


def test_the_image_writer_thread_is_named():
    from migrated.image.pipeline import PipelinedWriter

    class Sink:
        image_id = "20261128-abc"
        started = threading.Event()
        release = threading.Event()

        def set_layout(self, mappings):
            self.started.set()
            self.release.wait(10)

    w = PipelinedWriter(Sink())
    try:
        w.set_layout([])
        assert Sink.started.wait(10)
        assert _comm(w._thread) == "mig-writer-2026"
    finally:
        Sink.release.set()
        w.close()
