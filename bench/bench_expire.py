"""chatmail-expire / chatmail-fsreport on 20,000 mailboxes with 1,000,000 message files.

The tree is generated in a temporary directory (empty files: sizes live in the
``S=`` names, ages in the mtimes) and removed afterwards.  Each tool runs in a
fresh subprocess that reports its own wall time and peak RSS
(``resource.getrusage``), so the figures are those of the real command.
Environment: BENCH_EXPIRE_MAILBOXES / BENCH_EXPIRE_MESSAGES scale the tree,
BENCH_EXPIRE_DIR picks the parent directory of the temporary tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chatmaild.common.config import write_config
from testing.maildirs import generate_bench_tree

MAILBOXES = int(os.environ.get("BENCH_EXPIRE_MAILBOXES", "20000"))
MESSAGES = int(os.environ.get("BENCH_EXPIRE_MESSAGES", "1000000"))
TARGET_SECONDS = 60
TARGET_RSS_MB = 100

# runs the real entry point in a child and reports its own resource usage
_CHILD = """
import contextlib, io, json, resource, sys, time
from importlib import import_module
main = import_module(sys.argv[1]).main
out = io.StringIO()
start = time.monotonic()
with contextlib.redirect_stdout(out):
    rc = main(sys.argv[2:])
elapsed = time.monotonic() - start
rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rc": rc, "seconds": elapsed, "rss_kb": rss_kb, "out": out.getvalue()}))
"""


def run_tool(module: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, module, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parent = os.environ.get("BENCH_EXPIRE_DIR") or None
    tmp = Path(tempfile.mkdtemp(prefix="bench-expire-", dir=parent))
    try:
        mailboxes_dir = tmp / "mail"
        # a small quota so that quota relief (sorting by delivery time) runs for most mailboxes
        ini = write_config(
            tmp / "chatmail.ini",
            mail_domain="bench.example",
            mailboxes_dir=str(mailboxes_dir),
            max_mailbox_size="4M",
        )
        now = time.time()
        start = time.monotonic()
        files = generate_bench_tree(mailboxes_dir, now, mailboxes=MAILBOXES, messages=MESSAGES)
        gen = time.monotonic() - start
        print(f"expire_tree_mailboxes: {MAILBOXES} mailboxes")
        print(f"expire_tree_messages: {files} files")
        print(f"expire_generate_files_per_s: {files / gen:.0f} files/s")

        dry = run_tool("chatmaild.expire.main", str(ini))
        print(f"expire_dry_run_summary: {dry['out'].strip()}")
        print(f"expire_dry_run_seconds: {dry['seconds']:.2f} s (target < {TARGET_SECONDS})")
        print(f"expire_dry_run_files_per_s: {files / dry['seconds']:.0f} files/s")
        print(f"expire_dry_run_peak_rss: {dry['rss_kb'] / 1024:.1f} MB (target < {TARGET_RSS_MB})")

        report = run_tool("chatmaild.expire.fsreport", str(ini))
        print(f"fsreport_seconds: {report['seconds']:.2f} s")
        print(f"fsreport_files_per_s: {files / report['seconds']:.0f} files/s")
        print(f"fsreport_peak_rss: {report['rss_kb'] / 1024:.1f} MB")

        real = run_tool("chatmaild.expire.main", str(ini), "--remove")
        print(f"expire_remove_summary: {real['out'].strip()}")
        print(f"expire_remove_seconds: {real['seconds']:.2f} s")
        print(f"expire_remove_peak_rss: {real['rss_kb'] / 1024:.1f} MB")
        ok = dry["seconds"] < TARGET_SECONDS and dry["rss_kb"] / 1024 < TARGET_RSS_MB
        print(f"expire_targets_met: {int(ok)} bool")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
