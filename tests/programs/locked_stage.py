"""A stage program for tests: proves from the OS that a limit held.

    locked_stage.py LOCKDIR LIMIT RECORD SECONDS|@path [FAIL_UNTIL_ATTEMPT]

It tries LIMIT lock files ``LOCKDIR/slot-<i>.lock`` with a non-blocking ``flock`` and holds the
first it gets for its whole run. If all LIMIT are held by other runs, the limit was exceeded: it
appends ``OVERLAP`` to RECORD. Every run appends ``start``/``end`` lines (monotonic time, pid,
item) to RECORD, so a test can check overlaps independently too.
"""

import fcntl
import os
import sys
import time

lockdir, limit, record = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if sys.argv[4] == "@path":  # the duration is written in the item's file
    with open(os.environ["ORCH_PATH"]) as f:
        seconds = float(f.read().split()[0])
else:
    seconds = float(sys.argv[4])
fail_until = int(sys.argv[5]) if len(sys.argv) > 5 else 0
item = os.environ.get("ORCH_ITEM", "?")
stage = os.environ.get("ORCH_STAGE", "?")


def note(line: str) -> None:
    with open(record, "a") as f:
        f.write(f"{line} {stage} {time.monotonic():.6f} {os.getpid()} {item!r}\n")


held = None
for i in range(limit):
    fd = os.open(os.path.join(lockdir, f"{stage}-slot-{i}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        continue
    held = fd
    break
if held is None:
    note("OVERLAP")
note("start")
time.sleep(seconds)
note("end")
if int(os.environ.get("ORCH_ATTEMPT", "1")) < fail_until:
    sys.exit(7)
