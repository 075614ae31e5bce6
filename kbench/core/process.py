"""How a kbench process starts and stops: the same in the CLI and in a Ray worker.

- Start-up chatter of other libraries kept off stderr (``kbench.core.quiet``).
- SIGTERM unwinds like Ctrl-C (a KeyboardInterrupt), so temporary folders and locks are released on
  the way out. Every stop request is recorded in ``kbench.core.errors.STOP_REQUESTS``; one whose
  KeyboardInterrupt landed in a callback Python can't raise from (a garbage-collection or weakref
  callback: "Exception ignored in ...") is asked again, quietly, so that it still stops the process
  at once; long loops also ask ``stop_if_requested`` between their steps.
- kbench's own log lines (the ``kbench`` logger) on stderr.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import sys
import threading

from kbench.core.errors import STOP_REQUESTS


def set_up(verbose_flag: bool = False) -> None:
    """Quiet start-up (``verbose_flag``: not), SIGINT/SIGTERM unwinding like Ctrl-C, kbench's log
    lines on stderr. Call it before anything imports TensorFlow; calling it again does nothing more."""
    from kbench.core.quiet import set_up as quiet

    quiet(verbose_flag)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _terminate)
    if not getattr(sys.unraisablehook, "kbench", False):
        sys.unraisablehook = _unraisable_hook(sys.unraisablehook)
    logger = logging.getLogger("kbench")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("kbench: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged, not the stream of the first set-up
    (a command run in-process, as the tests do, swaps sys.stderr for each run)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _terminate(signal_number, frame):
    STOP_REQUESTS.append(signal_number)
    raise KeyboardInterrupt


def exit_now(code: int) -> None:
    """End this process with ``code``, skipping the interpreter's teardown: after a stop request
    that interrupted JAX just after a compilation, XLA's teardown can crash (SIGSEGV at exit instead
    of 143). Nothing is lost: kbench writes its files atomically, and its locks and temporary
    folders were released as the stack unwound."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
    os._exit(code)


def stop_if_requested() -> None:
    """KeyboardInterrupt if a SIGINT or SIGTERM has arrived, even one whose KeyboardInterrupt was lost."""
    if STOP_REQUESTS:
        raise KeyboardInterrupt


def _unraisable_hook(previous):
    def hook(unraisable) -> None:
        if not (STOP_REQUESTS and isinstance(unraisable.exc_type, type)):
            previous(unraisable)
        elif not issubclass(unraisable.exc_type, KeyboardInterrupt):
            previous(unraisable)
        else:
            # The stop request's KeyboardInterrupt was raised inside a callback that can't pass it on
            # (Python would print "Exception ignored in ..." and go on): deliver the signal again.
            try:
                _deliver_again(STOP_REQUESTS[-1])
            except KeyboardInterrupt:  # another request arrived meanwhile
                _deliver_again(STOP_REQUESTS[-1])

    hook.kbench = True
    return hook


def _deliver_again(signal_number: int) -> None:
    # From another thread, a moment later: delivered from here, the handler would run inside this
    # hook, which can't pass its KeyboardInterrupt on either.
    timer = threading.Timer(0.01, _thread.interrupt_main, args=(signal_number,))
    timer.daemon = True
    timer.start()
