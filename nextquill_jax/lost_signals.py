"""A signal whose handler's exception Python could not raise, delivered again.

Python raises a signal handler's exception wherever the main thread is. Inside a garbage-collector callback
(JAX registers one, `_xla_gc_callback`, which runs at every collection: often while JAX is imported and
traces) or a `__del__`, the exception cannot propagate: Python hands it to `sys.unraisablehook` and goes on,
so the signal is lost. A hook that sees such an exception calls `deliver_again` with its signal: a timer
thread makes the signal pending again 10 ms later, so that its handler runs at the main thread's next
ordinary line (if that is again such a callback, the hook sees it again). Not from the hook itself: a signal
made pending there would be handled inside the hook, where its exception is lost for good.

Imports nothing of this package, so any layer may name it (`cli` for a plain Ctrl-C, `eval.compare` for its
stop signals).
"""

from __future__ import annotations

import _thread
import threading


def deliver_again(signum: int) -> None:
    """Make `signum` pending again in the main thread 10 ms from now (from a daemon timer thread): its Python
    handler then runs there; a signal without one (`SIG_DFL`, `SIG_IGN`) is not delivered."""
    again = threading.Timer(0.01, _thread.interrupt_main, args=(signum,))
    again.daemon = True
    again.start()
