"""`deliver_again`: the signal whose exception was lost is handled again, soon, in the main thread, by its
Python handler; the timer that does it never keeps the process alive."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from nextquill_jax import lost_signals


class DeliveredError(Exception):
    """What the test's handler raises, as the CLI's Ctrl-C handler raises KeyboardInterrupt."""


def test_the_signal_reaches_its_handler_in_the_main_thread_soon() -> None:
    seen: list[tuple[int, bool]] = []

    def handler(signum: int, frame: object) -> None:
        seen.append((signum, threading.current_thread() is threading.main_thread()))
        raise DeliveredError

    previous = signal.signal(signal.SIGUSR1, handler)
    started = time.monotonic()
    try:
        lost_signals.deliver_again(signal.SIGUSR1)
        try:
            while time.monotonic() - started < 10.0:
                time.sleep(0.001)  # ordinary lines, where the handler's exception propagates
        except DeliveredError:
            pass
    finally:
        signal.signal(signal.SIGUSR1, previous)
    # Delivered, once, and not before the timer's delay (its 10 ms: test_the_timer_is_a_daemon_thread); the
    # wait's bound is generous so that a loaded machine cannot fail it.
    assert seen == [(signal.SIGUSR1, True)]
    assert time.monotonic() - started >= 0.005


def test_the_timer_is_a_daemon_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C that ends the main thread before the 10 ms pass must not wait for, or be kept alive by, the
    timer: it is a daemon. The timer is cancelled here before it fires."""
    timers: list[threading.Timer] = []

    class Recorded(threading.Timer):
        def start(self) -> None:
            timers.append(self)
            super().start()
            self.cancel()

    monkeypatch.setattr(lost_signals.threading, "Timer", Recorded)
    lost_signals.deliver_again(signal.SIGUSR1)
    (timer,) = timers
    timer.join(timeout=1.0)
    assert timer.daemon and timer.interval == 0.01
