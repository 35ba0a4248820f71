"""Take a directory's lock (`WorkdirLock`, as `train` does; with --file, the lock file another command takes
there, such as `demo.lock`) and hold it until killed; prints one line `RESULT {"pid": ...}` once it holds
the lock.

    hold_workdir_lock.py WORKDIR [--file NAME]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from nextquill_jax.train.workdir_lock import LOCK_FILE, TRAIN, WorkdirLock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--file", default=LOCK_FILE, help="the lock file's name in WORKDIR")
    args = parser.parse_args()
    # Only the file matters to whoever is refused: the messages are the refused command's own.
    lock = WorkdirLock(args.workdir, dataclasses.replace(TRAIN, file_name=args.file))
    assert lock.acquire(0, echo=print)
    print("RESULT " + json.dumps({"pid": os.getpid()}), flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
