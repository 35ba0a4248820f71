"""Take a workdir's train lock (`WorkdirLock`, as `train` does) and hold it until killed; prints one line
`RESULT {"pid": ...}` once it holds the lock.

    hold_workdir_lock.py WORKDIR
"""

from __future__ import annotations

import argparse
import json
import os
import time

from nextquill_jax.train.workdir_lock import WorkdirLock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    lock = WorkdirLock(parser.parse_args().workdir)
    assert lock.acquire(0, echo=print)
    print("RESULT " + json.dumps({"pid": os.getpid()}), flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
