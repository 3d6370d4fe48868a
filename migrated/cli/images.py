"""migratectl images: list, show, verify, export and remove stored images.

Works on the state directory directly (no daemon needed), so an operator
can inspect images on a node whose daemon is down.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import signal
import sys

from migrated.errors import ImageError, ImageNotFound
from migrated.image import ImageStore
from migrated.image import manifest as mf
from migrated.image.elfcore import export_image

DEFAULT_STATE_DIR = "/var/lib/migrated"


def _state_dir(args) -> str:
    return getattr(args, "state_dir", DEFAULT_STATE_DIR)


def _store(args) -> ImageStore:
    # These commands never create the state directory.
    return ImageStore(_state_dir(args), min_free_bytes=0, create=False)


def _gone(args, image_id: str) -> bool:
    """True if complete image ``image_id`` is not (or no longer) there."""
    try:
        return not os.path.isfile(os.path.join(_state_dir(args), "images",
                                               mf.check_image_id(image_id),
                                               mf.MANIFEST_NAME))
    except ImageError:
        return False


def _os_errors(fn):
    """Turn OSError (permissions, I/O) into a one-line message, not a trace.
    An image removed while the command ran (ENOENT under it) is reported as
    such; the hint about root and --state-dir only goes with EACCES/EPERM."""
    @functools.wraps(fn)
    def run(args) -> int:
        try:
            return fn(args)
        except OSError as exc:
            image_id = getattr(args, "image_id", None)
            if exc.errno == errno.ENOENT and image_id and _gone(args, image_id):
                raise ImageNotFound(f"image {image_id} not found (removed?)") from None
            hint = (" (run as root, or pass --state-dir)"
                    if exc.errno in (errno.EACCES, errno.EPERM) else "")
            raise ImageError(f"images {args.images_command}: {exc.strerror or exc}"
                             f"{': ' + exc.filename if exc.filename else ''}"
                             f"{hint}") from None
    return run


def _dump(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _mib(n) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f}M"


def _cmd_list(args) -> int:
    rows = _store(args).list()
    if args.json:
        _dump(rows)
        return 0
    if not rows:
        print(f"no images in {_state_dir(args)}")
        return 0
    print(f"{'IMAGE':32} {'PID':>7} {'DATA':>9} {'MAPS':>5}  {'SOURCE':16} COMMAND")
    for r in rows:
        if "error" in r:
            print(f"{r['image_id']:32} {'?':>7} {'?':>9} {'?':>5}  {'?':16} "
                  f"(unreadable: {r['error']})")
            continue
        cmd = " ".join(r.get("cmdline") or []) or (r.get("exe") or "")
        print(f"{r['image_id']:32} {r.get('pid') or '-':>7} "
              f"{_mib(r.get('data_bytes')):>9} {r.get('mappings', 0):>5}  "
              f"{(r.get('source_node') or '-')[:16]:16} {cmd[:60]}")
    return 0


def _cmd_show(args) -> int:
    m = _store(args).show(args.image_id)
    if args.json:
        _dump(m)
        return 0
    meta, t = m.get("meta", {}), m.get("totals", {})
    print(f"image       {m['image_id']}")
    print(f"digest      {m.get('digest')}")
    print(f"committed   {m.get('committed_at')}")
    for key in ("source_node", "migration_id", "pid", "exe"):
        if key in meta:
            print(f"{key:11} {meta[key]}")
    if meta.get("cmdline"):
        print(f"cmdline     {' '.join(meta['cmdline'])}")
    print(f"pages       {t.get('data_pages')} with data ({_mib(t.get('data_bytes'))}), "
          f"{t.get('zero_pages')} zero, in {t.get('chunks')} chunks")
    if meta.get("timings"):
        print(f"timings     {json.dumps(meta['timings'], sort_keys=True)}")
    print(f"\n{'START':>14}-{'END':<14} {'PERMS':5} {'KIND':11} {'DATA':>7} "
          f"{'ZERO':>6}  PATH")
    for mp in m["mappings"]:
        data = sum(n for _, n in mp.get("data", []))
        zero = sum(n for _, n in mp.get("zero", []))
        print(f"{int(mp['start'], 16):>14x}-{int(mp['end'], 16):<14x} "
              f"{mp['perms']:5} {mp['kind']:11} "
              f"{data if mp.get('migrates') else '-':>7} "
              f"{zero if mp.get('migrates') else '-':>6}  {mp.get('path', '')}")
    return 0


def _cmd_verify(args) -> int:
    res = _store(args).verify(args.image_id)
    if not res.ok and _gone(args, args.image_id):
        # Removed while verify read it: not a corrupt image.
        raise ImageNotFound(f"image {args.image_id} not found (removed?)")
    if args.json:
        _dump(res.to_dict())
    elif res.ok:
        print(f"{res.image_id}: OK ({res.chunks_checked} chunks, "
              f"{_mib(res.bytes_checked)} checked)")
    else:
        print(f"{res.image_id}: FAILED: {res.error}")
    return 0 if res.ok else 1


class _Terminated(BaseException):
    """SIGTERM/SIGHUP during an export: unwinds like Ctrl-C, so the
    temporary core file is removed, then exits 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_unwind():
    def handler(signum, _frame):
        raise _Terminated(signum)
    old = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old[sig] = signal.signal(sig, handler)
    except ValueError:              # not the main thread: leave them alone
        pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _cmd_export(args) -> int:
    try:
        with _signals_unwind():
            info = export_image(_store(args), args.image_id, args.core,
                                overwrite=args.force, file_pages=not args.no_file_pages)
    except _Terminated as exc:
        print(f"migratectl: export of {args.image_id} stopped by signal "
              f"{exc.signum}; no core file was written", file=sys.stderr)
        return 128 + exc.signum
    if args.json:
        _dump(info)
        return 0
    print(f"wrote {info['path']}: ELF core, {info['loads']} loads, "
          f"{_mib(info['data_bytes'])} of page data, {_mib(info['file_bytes'])} "
          "read from mapped files")
    if info["unbacked_files"]:
        names = ", ".join(info["unbacked_files"][:3])
        more = len(info["unbacked_files"]) - 3
        why = ("--no-file-pages" if args.no_file_pages
               else "their files could not be read here")
        print(f"note: {_mib(info['unbacked_bytes'])} of file-backed pages not in the "
              f"image carry no bytes in the core ({why}: {names}"
              f"{f' and {more} more' if more > 0 else ''}); gdb reads them through "
              "the NT_FILE note from those files where it finds them", file=sys.stderr)
    if info["changed_files"]:
        names = ", ".join(info["changed_files"][:3])
        more = len(info["changed_files"]) - 3
        print(f"warning: pages read from {names}{f' and {more} more' if more > 0 else ''} "
              "may differ from what the process had: the file was modified after the "
              "migration began (pass --no-file-pages to leave such pages to NT_FILE)",
              file=sys.stderr)
    return 0


def _cmd_rm(args) -> int:
    store = _store(args)
    removed: list[str] = []
    try:
        for image_id in args.image_ids:
            try:
                store.remove(image_id)
            except FileNotFoundError:
                # Another rm (or a withdrawal) moved it out first.
                raise ImageNotFound(f"image {image_id} not found (removed?)") from None
            removed.append(image_id)
            if not args.json:
                print(f"removed {image_id}")
    finally:
        if args.json:       # also when one failed: what did go (the error is on stderr)
            _dump({"removed": removed})
    return 0


def register(subparsers) -> None:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: accepted before or after the action without the inner
    # parser's default overwriting a value given to the outer one.
    common.add_argument("--state-dir", default=argparse.SUPPRESS, metavar="DIR",
                        help=f"daemon state directory (default {DEFAULT_STATE_DIR})")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true",
                         help="print machine-readable JSON")

    p = subparsers.add_parser("images", parents=[common],
                              help="list, inspect, verify, export or remove images",
                              description="Images of processes migrated to this node.")
    sub = p.add_subparsers(dest="images_command", metavar="ACTION")
    sub.required = True

    s = sub.add_parser("list", parents=[common, as_json], help="list complete images")
    s.set_defaults(func=_os_errors(_cmd_list))

    s = sub.add_parser("show", parents=[common, as_json],
                       help="print an image's manifest")
    s.add_argument("image_id", metavar="ID")
    s.set_defaults(func=_os_errors(_cmd_show))

    s = sub.add_parser("verify", parents=[common, as_json],
                       help="recompute every digest (exit 1 on any mismatch)")
    s.add_argument("image_id", metavar="ID")
    s.set_defaults(func=_os_errors(_cmd_verify))

    s = sub.add_parser("export", parents=[common, as_json],
                       help="write an image as an ELF core file (gdb, readelf)")
    s.add_argument("image_id", metavar="ID")
    s.add_argument("--core", required=True, metavar="FILE", help="core file to write")
    s.add_argument("--force", action="store_true",
                   help="replace FILE if it exists (a symlink there is replaced, "
                        "not followed)")
    s.add_argument("--no-file-pages", action="store_true",
                   help="do not read pages of file mappings the image lacks from "
                        "the files on this node; leave them to the NT_FILE note")
    s.set_defaults(func=_os_errors(_cmd_export))

    s = sub.add_parser("rm", parents=[common, as_json], help="remove images")
    s.add_argument("image_ids", metavar="ID", nargs="+")
    s.set_defaults(func=_os_errors(_cmd_rm))
