"""When to leave pre-copy: the convergence policy.

Pure logic, no I/O: the source engine feeds it the figures of each round
and asks, after every dirty-set collection, whether to go on copying live
or to freeze the target for the final delta.

The model follows QEMU (../shared/ANCHORS.md) and adds what it lacks:

- **Bandwidth** is measured continuously: every round reports the bytes it
  put on the wire and the seconds they took to reach the destination (to
  its answer to the round's end, where it answers: the kernel's buffers
  and a shaped link's queue hide a small round's transfer from the sender;
  ``round_drained``); the estimate is
  bytes over time across a moving window of the last
  ``BANDWIDTH_WINDOW_ROUNDS`` rounds (weighted by bytes, so a round of ten
  pages cannot swing it).
- **Expected downtime** = pending dirty bytes / bandwidth + the fixed cost
  of the frozen phase (the duration of the last collection: with the digest
  tracker the final collection re-reads every page while the target is
  frozen, which can dominate the freeze) + the destination's own estimate
  of flushing the page data it has not made durable yet (its "backlog"
  reports: the commit inside the freeze must flush it; QEMU has no disk
  at the far end and P.Haul never asks).  The source engine also waits
  for that disk before a collection while the flush alone would take a
  twentieth of the target (SourceMigration._wait_for_destination).
- Leave pre-copy when (first match wins):

  ``downtime-target``  expected downtime <= ``downtime_ms`` -- unless the
                       pending set at least halved since the previous
                       collection: then one more round is worth its cost
                       and the freeze ends well below the target (QEMU
                       stops as soon as it is under; see
                       CONVERGE_SHRINK_FACTOR);
  ``max-rounds``       ``max_rounds`` live rounds were sent
                       (``max_rounds == 0`` is plain stop-and-copy: the
                       policy says ``stop-and-copy`` before any live round);
  ``plateau``          the dirty set has not shrunk below its best so far
                       (by at least ``PLATEAU_SHRINK_FRACTION``) for
                       ``plateau_rounds`` rounds -- more rounds only burn
                       bandwidth -- or the fixed cost of the frozen phase
                       alone misses the target and the transfer is a small
                       part of it (FLOOR_FRACTION): the freeze is at its
                       floor;
  ``timeout``          another round would not fit in ``timeout_s``.

- **The timeout decision** (documented choice): the timeout is a budget for
  the whole migration.  When the next round would not fit, the policy
  stops pre-copy *if* the final delta is expected to fit in what is left of
  the budget (reason ``timeout``); otherwise it gives up *before* freezing,
  with ``fail`` set to "did not converge within timeout" -- the target never
  stops for a transfer that would overrun the budget anyway.  A round that
  is still streaming when the budget runs out also fails (the source engine
  checks :meth:`ConvergencePolicy.expired` between batches).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from migrated.runs import PAGE_SIZE

# Rounds averaged for the bandwidth estimate.  QEMU uses 100 ms windows of
# one continuous stream; our rounds are separated by collections, so the
# window is counted in rounds: three smooths a short or latency-bound round
# without lagging far behind a link whose speed changes.
BANDWIDTH_WINDOW_ROUNDS = 3

# A round counts as "shrinking" only if its dirty set is at least 5 % below
# the best seen so far: noise of a steady writer must not reset the plateau
# counter forever.
PLATEAU_SHRINK_FRACTION = 0.05

# Under the downtime target, one more round is taken only if the pending
# set at least halved since the previous collection: geometric progress is
# worth a round (it costs one collection), a writer's steady state is not.
CONVERGE_SHRINK_FACTOR = 0.5

# Expected downtime below which another round cannot buy anything
# measurable (the freeze itself, signals and the commit cost more).
NOTHING_TO_GAIN_MS = 2.0

# Over the target, when the transfer is at most this fraction of the fixed
# cost of the frozen phase (e.g. the digest tracker's full re-read), the
# freeze has reached its floor: stop as at a plateau instead of spending
# plateau_rounds more rounds finding out.
FLOOR_FRACTION = 0.1

# Bandwidth assumed before anything was measured (bytes/s): only used if a
# decision is requested before the first round; 100 MiB/s is a typical
# gigabit-and-a-bit link, neither optimistic nor hopeless.
DEFAULT_BANDWIDTH = 100 * 1024 * 1024

# Shortest duration we divide by (s): a round that sent nothing measurable
# must not produce an infinite bandwidth.
MIN_DURATION_S = 1e-4

STOP_DOWNTIME = "downtime-target"
STOP_PLATEAU = "plateau"
STOP_MAX_ROUNDS = "max-rounds"
STOP_TIMEOUT = "timeout"
STOP_AND_COPY = "stop-and-copy"

TIMEOUT_MESSAGE = "did not converge within timeout"


@dataclass(frozen=True)
class Decision:
    """What to do after a collection.

    ``stop``: freeze now and send the final delta; ``reason`` says why.
    ``fail``: give up (not None only for the timeout case); the caller must
    not freeze.  ``expected_downtime_ms`` is the estimate the decision used.
    """
    stop: bool
    reason: str | None = None
    fail: str | None = None
    expected_downtime_ms: float = 0.0


@dataclass
class _Sample:
    nbytes: int
    seconds: float


@dataclass
class ConvergencePolicy:
    downtime_ms: float = 300.0
    max_rounds: int = 30
    plateau_rounds: int = 3
    timeout_s: float = 600.0
    clock: Callable[[], float] = time.monotonic

    started: float | None = None
    rounds_sent: int = 0
    stop_reason: str | None = None
    expected_downtime_ms: float = 0.0
    _window: deque = field(default_factory=lambda: deque(maxlen=BANDWIDTH_WINDOW_ROUNDS))
    _best_dirty: int | None = None
    _stale_rounds: int = 0
    _last_round_s: float = 0.0
    _prev_pending: int | None = None

    def __post_init__(self) -> None:
        if self.max_rounds < 0:
            raise ValueError("max_rounds must be >= 0")
        if self.plateau_rounds < 1:
            raise ValueError("plateau_rounds must be >= 1")
        if self.downtime_ms < 0 or self.timeout_s <= 0:
            raise ValueError("downtime_ms must be >= 0 and timeout_s > 0")

    # -- inputs ---------------------------------------------------------------

    def begin(self, now: float | None = None) -> Decision:
        """Start the clock.  Returns the stop-and-copy decision for
        ``max_rounds == 0`` (freeze before round 0), else "go on"."""
        self.started = self.clock() if now is None else now
        if self.max_rounds == 0:
            self.stop_reason = STOP_AND_COPY
            return Decision(True, STOP_AND_COPY)
        return Decision(False)

    def round_sent(self, nbytes: int, send_seconds: float, round_seconds: float | None = None,
                   pages: int | None = None) -> None:
        """A live round finished: ``nbytes`` on the wire in ``send_seconds``
        of reading+sending; ``round_seconds`` its whole wall time including
        the collection (defaults to send_seconds), used for the timeout;
        ``pages`` it carried (default: nbytes in pages) -- round 0's size is
        what the first collection is compared with."""
        self.rounds_sent += 1
        if self._prev_pending is None:
            self._prev_pending = int(pages if pages is not None else nbytes // PAGE_SIZE)
        self._window.append(_Sample(int(nbytes), max(float(send_seconds), MIN_DURATION_S)))
        self._last_round_s = float(round_seconds if round_seconds is not None else send_seconds)

    def round_drained(self, seconds: float) -> None:
        """The last round reached the destination ``seconds`` after it
        began (its answer to RoundEnd came): on a link slower than the
        kernel's buffers that, not the sending time, is what the round's
        bytes took -- the sample is stretched to it (never shortened)."""
        if self._window:
            last = self._window[-1]
            self._window[-1] = _Sample(last.nbytes, max(last.seconds, float(seconds)))

    # -- estimates ------------------------------------------------------------

    @property
    def bandwidth(self) -> float:
        """Bytes per second over the window (DEFAULT_BANDWIDTH before any)."""
        total_b = sum(s.nbytes for s in self._window)
        total_s = sum(s.seconds for s in self._window)
        if total_b <= 0:
            return float(DEFAULT_BANDWIDTH)
        return total_b / max(total_s, MIN_DURATION_S)

    def estimate_downtime_ms(self, pending_pages: int, fixed_ms: float = 0.0) -> float:
        return pending_pages * PAGE_SIZE / self.bandwidth * 1000.0 + fixed_ms

    def elapsed(self, now: float | None = None) -> float:
        if self.started is None:
            return 0.0
        return (self.clock() if now is None else now) - self.started

    def expired(self, now: float | None = None) -> bool:
        """True once the whole budget is spent (checked during a round)."""
        return self.started is not None and self.elapsed(now) >= self.timeout_s

    # -- the decision ---------------------------------------------------------

    def after_collect(self, pending_pages: int, fixed_ms: float = 0.0,
                      now: float | None = None, dest_ms: float = 0.0,
                      settle_ms: float = 0.0) -> Decision:
        """Called after each live round's successor collection: the tracker
        just returned ``pending_pages`` dirty pages; ``fixed_ms`` is the cost
        of the frozen phase other than the transfer (see module doc);
        ``dest_ms`` the destination's own estimate of flushing what it has
        not made durable yet (its "backlog" reports), which the commit
        inside the freeze would have to do; ``settle_ms`` the source's
        estimate of re-checking recently sent pages after the final delta
        (a target with asynchronous I/O).  Like ``dest_ms`` more rounds can
        shrink it (they age the big rounds out): never a floor."""
        pending_pages = int(pending_pages)
        dest_ms = max(0.0, float(dest_ms)) + max(0.0, float(settle_ms))
        est = self.estimate_downtime_ms(pending_pages, fixed_ms) + dest_ms
        self.expected_downtime_ms = est

        improved = self._best_dirty is None or pending_pages < self._best_dirty * (1.0 - PLATEAU_SHRINK_FRACTION)
        if self._best_dirty is None or pending_pages < self._best_dirty:
            self._best_dirty = pending_pages
        self._stale_rounds = 0 if improved else self._stale_rounds + 1

        def stop(reason: str) -> Decision:
            self.stop_reason = reason
            return Decision(True, reason, None, est)

        prev = self._prev_pending
        self._prev_pending = pending_pages
        if est <= self.downtime_ms:
            # Under the target.  QEMU stops here; we take one more round
            # while that still halves what the freeze has to carry (a
            # steady writer converges geometrically towards rate x round
            # time), so the freeze ends up well below the target instead
            # of just under it.  Never past the caps below.
            keeps_halving = (prev is not None and pending_pages > 0
                             and pending_pages <= prev * CONVERGE_SHRINK_FACTOR
                             and est > NOTHING_TO_GAIN_MS)
            if not keeps_halving or self.rounds_sent >= self.max_rounds or \
                    self._next_round_overruns(est, now):
                return stop(STOP_DOWNTIME)
            return Decision(False, None, None, est)
        if self.rounds_sent >= self.max_rounds:
            return stop(STOP_MAX_ROUNDS)
        if self._stale_rounds >= self.plateau_rounds:
            return stop(STOP_PLATEAU)
        # (est - fixed_ms keeps the destination's flush: waiting for its disk
        # can still shorten the freeze, so it never makes this a floor.)
        if fixed_ms > 0 and est - fixed_ms <= FLOOR_FRACTION * fixed_ms:
            # The frozen phase's fixed cost alone misses the target and the
            # transfer is already a small part of it: no round can help.
            return stop(STOP_PLATEAU)
        if self._next_round_overruns(est, now):
            if est / 1000.0 < self.timeout_s - self.elapsed(now):
                return stop(STOP_TIMEOUT)
            self.stop_reason = STOP_TIMEOUT
            return Decision(False, STOP_TIMEOUT, TIMEOUT_MESSAGE, est)
        return Decision(False, None, None, est)

    def _next_round_overruns(self, est_ms: float, now: float | None) -> bool:
        """Would another round plus the final delta overrun the timeout?
        The next round takes about as long as the last one (it sends the
        pending set at the measured rate, so at least est too)."""
        remaining = self.timeout_s - self.elapsed(now)
        next_round_s = max(self._last_round_s, est_ms / 1000.0)
        return next_round_s + est_ms / 1000.0 >= remaining
