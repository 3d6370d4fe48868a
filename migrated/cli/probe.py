"""`migratectl probe [--json]`: what this kernel can do (like `criu check`).

Runs the probe in this process (no daemon needed): the answer is about the
machine's kernel, which the daemon shares.
"""

from __future__ import annotations

import argparse
import json

from migrated.kernel.probe import probe


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def format_table(r: dict) -> str:
    cats = ", ".join(r["pagemap_scan_categories"]) or "-"
    rows = [
        ("kernel", f"{r['kernel']} ({r['arch']}, page {r['page_size']} B, uid {r['uid']})"),
        ("soft-dirty", f"{_yes(r['soft_dirty'])}: {r['soft_dirty_reason']}"),
        ("pagemap", f"{r['pagemap']}, PFNs {'visible' if r['pagemap_pfn'] else 'hidden'}"),
        ("PAGEMAP_SCAN", f"{_yes(r['pagemap_scan'])}"
                         + (f" [{cats}]" if r["pagemap_scan"] else f": {r['pagemap_scan_reason']}")),
        ("uffd async WP", f"{_yes(r['uffd_wp_async'])}: {r['uffd_wp_async_reason']}"),
        ("process_vm_readv", f"{_yes(r['process_vm_readv'])}: {r['process_vm_readv_reason']}"),
        ("ptrace_scope", "-" if r["ptrace_scope"] is None else str(r["ptrace_scope"])),
        ("trackers", ", ".join(r["trackers_available"])),
        ("tracker (auto)", r["tracker"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    result = probe()
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(format_table(result))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "probe", help="check what this kernel supports (soft-dirty, PAGEMAP_SCAN, ...)",
        description="Probe the running kernel's memory-tracking features by "
                    "self-test and show which dirty tracker 'auto' picks.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
