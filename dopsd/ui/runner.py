"""`python -m dopsd.ui.runner RC_FILE -- COMMAND…`: run one job's command and record its exit status.

The app starts every job through this small parent (in a new session, so its process group is the job's) so that
the exit status survives an app restart: a restarted app cannot wait for a process it did not start, but it can
read RC_FILE. SIGTERM to the group reaches the command itself (the default action, or its own handler); this
parent only keeps waiting so that it can write the status. A SIGKILL ends both and leaves no RC_FILE.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m dopsd.ui.runner RC_FILE -- COMMAND...", file=sys.stderr)
        return 2
    rc_file, command = argv[0], argv[2:]
    # A Python handler (not SIG_IGN, which a child would inherit) keeps this parent alive; the command gets the
    # default disposition back at exec.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    try:
        proc = subprocess.Popen(command)
    except OSError as err:
        print(f"dopsd ui: cannot start {command[0]}: {err}", file=sys.stderr)
        returncode = 127
    else:
        while True:
            try:
                returncode = proc.wait()
                break
            except InterruptedError:
                continue
    tmp = f"{rc_file}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"returncode": returncode, "ended": time.time()}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, rc_file)
    return 0 if returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
