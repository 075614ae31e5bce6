"""How a kbench process starts and stops: the same in the CLI and in a Ray worker.

- Start-up chatter of other libraries kept off stderr (``kbench.core.quiet``).
- SIGTERM unwinds like Ctrl-C (a KeyboardInterrupt), so temporary folders and locks are released on
  the way out. Every stop request is recorded in ``kbench.core.errors.STOP_REQUESTS``; one whose
  KeyboardInterrupt landed in a callback Python can't raise from (a garbage-collection or weakref
  callback: "Exception ignored in ...") is asked again, quietly, so that it still stops the process
  at once; long loops also ask ``stop_if_requested`` between their steps.
- kbench's own log lines (the ``kbench`` logger) on stderr.
- A stopped command ends with ``exit_now`` (no interpreter teardown), after the hooks registered with
  ``at_exit_now`` (a local Ray a study started is shut down, not orphaned).
- Child processes: ``die_with_parent`` (the kernel kills a child when kbench dies, even by kill -9),
  ``orphan_proof`` (a command line that does so without a ``preexec_fn``), ``child_death`` (a
  child's failure as one line: the signal that killed it, or the last line it wrote). The conversion
  child, ``kbench launch`` and the benchmarks' children all go through these.

The terminal's stderr has one other owner: ``kbench.core.quiet``, which alone points file descriptor 2
elsewhere (``redirected``), as a stack (see there).
"""

from __future__ import annotations

import _thread
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from kbench.core.errors import STOP_REQUESTS

PR_SET_PDEATHSIG = 1  # prctl(2)
_EXIT_HOOKS: list[Callable[[], object]] = []


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
    folders were released as the stack unwound. The ``at_exit_now`` hooks run first, newest first;
    one that fails is skipped."""
    while _EXIT_HOOKS:
        try:
            _EXIT_HOOKS.pop()()
        except Exception:  # noqa: BLE001  (the exit goes on: the status is what the user waits for)
            pass
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
    os._exit(code)


def at_exit_now(hook: Callable[[], object]) -> None:
    """Run ``hook`` before ``exit_now`` ends this process (what ``atexit`` would do, which
    ``os._exit`` skips): e.g. ``ray.shutdown`` for a local Ray this process started."""
    if hook not in _EXIT_HOOKS:
        _EXIT_HOOKS.append(hook)


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


# -- child processes ----------------------------------------------------------------------------------


def die_with_parent(parent_pid: int | None = None) -> None:
    """In a child process kbench started: the kernel kills it (SIGKILL) when its parent dies, even by
    kill -9, so nothing kbench started outlives it: no rank left training, no ONNX conversion left
    holding memory (Linux; elsewhere nothing happens). With ``parent_pid``, a child whose parent died
    before the request exits at once.

    Call it first thing in the child (the conversion child does), never as a ``preexec_fn``: that runs
    between fork and exec in a copy of a parent that may have threads (JAX's, a reader's), which Python
    documents as unsafe. For a command that isn't kbench's, ``orphan_proof`` wraps it.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def orphan_proof(argv: list[str]) -> list[str]:
    """``argv`` run through a small Python that asks to die with this process and then ``exec``s it
    (the request survives exec): ``die_with_parent`` for any command, without a ``preexec_fn``."""
    return [sys.executable, "-m", "kbench.core.process", str(os.getpid()), *argv]


def signal_name(number: int) -> str:
    """``SIGKILL (signal 9)`` for 9; ``signal 99`` for a number Python doesn't name."""
    try:
        return f"{signal.Signals(number).name} (signal {number})"
    except ValueError:
        return f"signal {number}"


def killed_by(number: int) -> str:
    """``killed by SIGKILL (signal 9) (out of memory?)``: the kernel's OOM killer sends SIGKILL."""
    hint = " (out of memory?)" if number == signal.SIGKILL else ""
    return f"killed by {signal_name(number)}{hint}"


def last_line(text: str | None, silent: str = "no output") -> str:
    """The last non-blank line of a child's output, stripped; ``silent`` when it wrote none."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else silent


def child_death(returncode: int, stderr: str | None, *, status: bool = False, silent: str = "no output") -> str | None:
    """A finished child's failure in one line, or None when it exited 0: ``its process was killed by
    SIGKILL (signal 9) (out of memory?)`` (its last line would be whatever it printed before the
    kill), else the last line it wrote to stderr (``silent`` when none), after ``its process exited
    N:`` with ``status``.

    >>> child_death(1, "Traceback ...\\nValueError: boom\\n")
    'ValueError: boom'
    >>> child_death(-9, "", status=True)
    'its process was killed by SIGKILL (signal 9) (out of memory?)'
    """
    if returncode == 0:
        return None
    if returncode < 0:
        return f"its process was {killed_by(-returncode)}"
    line = last_line(stderr, silent)
    return f"its process exited {returncode}: {line}" if status else line


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + N when signal N killed it."""
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":  # orphan_proof's wrapper: python -m kbench.core.process PARENT_PID COMMAND ...
    die_with_parent(int(sys.argv[1]))
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as error:
        sys.stderr.write(f"kbench: can't start {sys.argv[2]}: {error.strerror}\n")
        os._exit(127)
