"""Turns a capture that hangs into an error that says where it hung.

A capture can block for ever (a library that lazily spawns a subprocess mid-capture, a collective
whose peer never arrives). On the main thread a real-time timer signal interrupts even a blocking
system call; on any other thread the error is raised asynchronously at the next bytecode.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

logger = logging.getLogger("tessera.graphs")


class CaptureTimeoutError(RuntimeError):
    pass


@contextmanager
def watchdog(timeout_s: float, where: Callable[[], str]) -> Iterator[None]:
    """Raise `CaptureTimeoutError` in this thread if the block runs longer than `timeout_s`.
    `where()` describes the current position (piece, size) when it fires."""
    if threading.current_thread() is threading.main_thread():
        with _signal_watchdog(timeout_s, where):
            yield
    else:
        with _thread_watchdog(timeout_s, where):
            yield


def _message(timeout_s: float, where: Callable[[], str]) -> str:
    return f"graph capture of {where()} did not finish within {timeout_s:g}s"


def _dump(message: str) -> None:
    logger.error("%s; stacks of all threads follow", message)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


@contextmanager
def _signal_watchdog(timeout_s: float, where: Callable[[], str]) -> Iterator[None]:
    def fire(signum: int, frame: FrameType | None) -> None:
        message = _message(timeout_s, where)
        _dump(message)
        raise CaptureTimeoutError(message)

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def _thread_watchdog(timeout_s: float, where: Callable[[], str]) -> Iterator[None]:
    target = threading.get_ident()
    done = threading.Event()

    def fire() -> None:
        if done.wait(timeout_s):
            return
        _dump(_message(timeout_s, where))
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(target), ctypes.py_object(CaptureTimeoutError)
        )

    timer = threading.Thread(target=fire, name="tessera-capture-watchdog", daemon=True)
    timer.start()
    try:
        yield
    finally:
        done.set()
        timer.join()
