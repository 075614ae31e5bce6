"""How a kbench process starts and stops: the same in the CLI and in a Ray worker.

- Start-up chatter of other libraries kept off stderr (``kbench.quiet``).
- SIGTERM unwinds like Ctrl-C (a KeyboardInterrupt), so temporary folders and locks are released on
  the way out; every stop request is recorded in ``kbench.errors.STOP_REQUESTS``, so that one whose
  KeyboardInterrupt Python swallowed is still honoured.
- kbench's own log lines (the ``kbench`` logger) on stderr.
"""

from __future__ import annotations

import logging
import signal
import sys

from kbench.errors import STOP_REQUESTS


def set_up(verbose_flag: bool = False) -> None:
    """Quiet start-up (``verbose_flag``: not), SIGINT/SIGTERM unwinding like Ctrl-C, kbench's log
    lines on stderr. Call it before anything imports TensorFlow; calling it again does nothing more."""
    from kbench.quiet import set_up as quiet

    quiet(verbose_flag)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _terminate)
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
