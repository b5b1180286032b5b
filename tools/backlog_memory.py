"""Peak memory of `orchestrator run` started on a backlog of waiting files.

Makes N empty files in a fresh temporary folder, starts the service on them (one `true` stage
at concurrency 2, ``on_done = "delete"``), waits until the folder is empty, and prints the
service's peak and current resident size (VmHWM, VmRSS from ``/proc/<pid>/status``) before
SIGTERM. With ``--against DIR`` each round also runs the checkout in DIR (on PYTHONPATH), the
two alternated::

    .venv/bin/python tools/backlog_memory.py --files 50000 --rounds 2 --against /tmp/base
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """\
state_dir = "state"
[http]
listen = false
[log]
level = "WARNING"
[[sources]]
name = "in"
type = "directory"
path = "inbox"
route = ["s"]
settle = "0s"
poll_interval = "0.5s"
on_done = "delete"
[[stages]]
name = "s"
command = ["true"]
concurrency = 2
"""


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def one(files: int, tree: str | None, timeout: float) -> tuple[float, float, float]:
    """(peak MiB, current MiB, seconds until the folder was empty) for one service."""
    with tempfile.TemporaryDirectory(prefix="backlog-") as tmp:
        folder = Path(tmp)
        inbox = folder / "inbox"
        inbox.mkdir()
        for i in range(files):
            (inbox / f"file-with-a-longish-name-{i}").touch()
        (folder / "svc.toml").write_text(CONFIG)
        env = dict(os.environ)
        if tree is not None:
            env["PYTHONPATH"] = tree
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "run", "-c", "svc.toml"], cwd=folder, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            while any(os.scandir(inbox)):
                if proc.poll() is not None:
                    raise SystemExit(f"the service exited {proc.returncode} before it was done")
                if time.monotonic() - start > timeout:
                    raise SystemExit(f"not done after {timeout:.0f} s")
                time.sleep(0.5)
            took = time.monotonic() - start
            time.sleep(2)  # its last disposals and checkpoints
            peak, now = status_kib(proc.pid, "VmHWM"), status_kib(proc.pid, "VmRSS")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    return peak / 1024, now / 1024, took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--against", metavar="DIR", help="also run the checkout in DIR")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    trees: list[tuple[str, str | None]] = [("this checkout", None)]
    if args.against:
        trees.append((args.against, os.path.abspath(args.against)))
    for round_ in range(args.rounds):
        for name, tree in trees if round_ % 2 == 0 else trees[::-1]:
            peak, now, took = one(args.files, tree, args.timeout)
            print(f"{name}: {args.files:,} files, peak {peak:.1f} MiB, after {now:.1f} MiB, "
                  f"folder empty after {took:.1f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
