"""The migration engine: pre-copy rounds (source), image writing (dest),
the convergence policy and the blocking transport they run over.

Runs in worker threads of the daemon; see docs/ARCHITECTURE.md,
"Engine <-> daemon seam".
"""

from migrated.engine.dest import DestLimits, DestMigration
from migrated.engine.policy import ConvergencePolicy, Decision
from migrated.engine.source import SendOptions, SourceMigration
from migrated.engine.transport import (BlockingTransport, Channel, TransportClosed,
                                       TransportError, TransportTimeout)

__all__ = ["BlockingTransport", "Channel", "ConvergencePolicy", "Decision", "DestLimits",
           "DestMigration", "SendOptions", "SourceMigration", "TransportClosed",
           "TransportError", "TransportTimeout"]
