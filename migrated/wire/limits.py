"""Every bound of wire protocol v1, one named constant each.

A peer we do not trust can only make us hold what these allow: the length
prefix of a frame is checked against them before its body is buffered, and
msgpack decoding is given per-message limits so it cannot build large or
deep structures.  protocol/SPEC.md quotes these numbers; change both.
"""

from __future__ import annotations

# -- stream ------------------------------------------------------------------

# Sent once by each side before its first frame.  Seven ASCII bytes name the
# protocol (a TLS or HTTP client fails on the first byte); the eighth is the
# *framing* version.  Message-level versions are negotiated in Hello/Welcome.
PREAMBLE_MAGIC = b"MIGRATD"
FRAMING_VERSION = 1
PREAMBLE = PREAMBLE_MAGIC + bytes([FRAMING_VERSION])
PREAMBLE_SIZE = len(PREAMBLE)  # 8

# Length prefix: 4-byte big-endian unsigned byte count of the msgpack body.
LENGTH_PREFIX_SIZE = 4

# Message versions this implementation speaks (Hello lists, Welcome picks).
SUPPORTED_VERSIONS = (1,)
# Highest version number a peer may name; keeps the list check cheap.
MAX_VERSION_NUMBER = 0xFFFF
# A Hello offers at most this many versions (we will never have 16 live).
MAX_VERSIONS = 16

# -- pages -------------------------------------------------------------------

# Page sizes a peer may declare: 4 KiB (x86-64, most arm64) to 64 KiB
# (arm64/ppc64 large pages).  v1 further requires both ends to use the same.
MIN_PAGE_SIZE = 4096
MAX_PAGE_SIZE = 65536

# Pages per Pages message.  1024 x 4 KiB = 4 MiB: large enough that the
# per-message cost (one digest, one msgpack header, one syscall) vanishes,
# small enough that the destination holds only a few MiB per connection.
MAX_BATCH_PAGES = 1024
# Page data per Pages message whatever the page size (with 64 KiB pages a
# batch is at most 64 pages).
MAX_BATCH_BYTES = 4 * 1024 * 1024

# Runs per Zeros or Dropped message (16 bytes each on the wire: 1 MiB).
# A Pages message has at most one run per page, so MAX_BATCH_PAGES runs.
MAX_RUNS = 65536

# User address space bound: x86-64 with 5-level paging tops out just below
# 2**56 (arm64 at 2**52).  Mappings and page runs must end at or below it;
# only "skip" mappings (e.g. [vsyscall] at 0xffffffffff600000) may lie above.
USER_ADDRESS_LIMIT = 1 << 56
# Largest end address at all (a u64 address space, exclusive end).
ADDRESS_SPACE_END = 1 << 64

# Digest of a Pages batch: xxh3-128, big-endian canonical form (16 bytes).
DIGEST_SIZE = 16

# -- layout ------------------------------------------------------------------

# Mappings per Layout: the Linux default vm.max_map_count is 65530.
MAX_MAPPINGS = 65536
# Bytes of one mapping path: PATH_MAX.
MAX_PATH_BYTES = 4096
# Bytes of all paths of one Layout together (65536 mappings x 64 bytes);
# real processes use a few KiB to a few hundred KiB.
MAX_LAYOUT_PATH_BYTES = 4 * 1024 * 1024

# -- strings and small lists -------------------------------------------------

# Tokens (migration id, capability, tracker, error code, option key, image
# id): [A-Za-z0-9][A-Za-z0-9._:-]*, at most this many bytes.  Safe to log
# and never a path.
MAX_TOKEN_BYTES = 64
# Digest strings in Committed: "xxh3-128:" + 32 hex digits fits easily.
MAX_DIGEST_STR_BYTES = 128
# Node names: a DNS name is at most 253 bytes.
MAX_NODE_BYTES = 255
# Human text (Error.message, Cancel.reason).
MAX_TEXT_BYTES = 4096
# Capabilities offered in one Hello or Welcome.
MAX_CAPABILITIES = 32
# Entries in Start.options and bytes of one string option value.
MAX_OPTIONS = 32
MAX_OPTION_STR_BYTES = 255
# /proc/PID/cmdline bytes carried by Start: MAX_ARG_STRLEN (32 pages).  The
# command line is informational; a source truncates it at an argument
# boundary to fit.
MAX_CMDLINE_BYTES = 131072

# -- integers ----------------------------------------------------------------

U32_MAX = (1 << 32) - 1
U63_MAX = (1 << 63) - 1
U64_MAX = (1 << 64) - 1
# Linux PID_MAX_LIMIT on 64-bit (pid_max cannot be raised above it).
PID_MAX_LIMIT = 4 * 1024 * 1024
# Rounds are numbered 0.. and fit a u32 (policies stop after tens).
MAX_ROUND = U32_MAX
# Page counts that can exist in a u64 address space of 4 KiB pages.
MAX_TOTAL_PAGES = 1 << 52
# Figures in RoundEnd (ms, bytes/s, ...) are finite and below this.
MAX_FIGURE = float(1 << 63)

# -- frame sizes (checked on the length prefix, before buffering) -------------

# Every message type but these four (Release and Released included) fits a small frame: the largest is an
# Error with MAX_TEXT_BYTES of message or a Hello with every capability.
MAX_CONTROL_FRAME = 16 * 1024
# Start: MAX_CMDLINE_BYTES + exe path + options.
MAX_START_FRAME = 256 * 1024
# Layout: 31 column bytes x MAX_MAPPINGS (~2 MiB) + paths (4 MiB) + header.
MAX_LAYOUT_FRAME = 9 * 1024 * 1024
# Pages: data + runs (<= MAX_BATCH_PAGES x 16 bytes) + a small header.
MAX_PAGES_FRAME = MAX_BATCH_BYTES + 64 * 1024
# Zeros / Dropped: MAX_RUNS x 16 bytes + a small header.
MAX_RUNS_FRAME = MAX_RUNS * 16 + 4096
# Any frame at all.  A length prefix above this is rejected at once.
MAX_FRAME = max(MAX_CONTROL_FRAME, MAX_START_FRAME, MAX_LAYOUT_FRAME,
                MAX_PAGES_FRAME, MAX_RUNS_FRAME)
# Before Accept only handshake messages are legal, so only this much may be
# declared (bounds what an idle or half-open connection can make us hold).
MAX_HANDSHAKE_FRAME = MAX_START_FRAME
# Longest message type name.
MAX_TYPE_NAME_BYTES = 32

# Unconsumed received bytes a connection will hold: one largest frame plus
# one more pipelined behind it.  Drain next_event() between receive_data()
# calls and this is never reached.
RECEIVE_BUFFER_LIMIT = 2 * (MAX_FRAME + LENGTH_PREFIX_SIZE) + PREAMBLE_SIZE

# -- timers (recommendations for the I/O layer; sans-IO code has no clock) ----

# Send a Keepalive after this long without sending anything.
KEEPALIVE_INTERVAL_S = 5.0
# Give up on a peer after this long without receiving any byte (three
# missed keepalives plus slack for a full 4 MiB frame on a slow link).
IDLE_TIMEOUT_S = 30.0
# Preamble + Hello/Welcome + Start/Accept must complete within this.
HANDSHAKE_TIMEOUT_S = 10.0
# CommitRequest -> Committed: the destination fsyncs the image.  Also the
# source's wait from Release to Released (one rename and two directory
# fsyncs: far less, but the same bound keeps one knob).
COMMIT_TIMEOUT_S = 120.0
# The destination publishes only if Release is in its hands within this
# share of the source's shortest wait for Released (min of COMMIT_TIMEOUT_S,
# IDLE_TIMEOUT_S and the socket timeout: 15 s by default) after it sent
# Committed.  The source sent Release after Committed reached it, so a
# destination that was stalled past this point may face a
# source that has already given up and resumed its process: it removes
# the staged image instead (the other half is left for the rename, the
# fsyncs and Released to reach the source).
RELEASE_PUBLISH_SHARE = 0.5
