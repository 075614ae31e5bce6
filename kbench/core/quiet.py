"""A quiet terminal: third-party start-up chatter off stderr unless ``-v`` / ``KBENCH_VERBOSE=1``.

What is silenced, and how:

- TensorFlow's C++ log lines once its logging is set up (``E0000 ... failed call to cuInit``):
  ``TF_CPP_MIN_LOG_LEVEL=3``, set before TensorFlow loads (under ``-v`` a user's own level applies).
- The lines TensorFlow's shared libraries write *while they load*, before absl's logging is
  initialised ("WARNING: All log messages before absl::InitializeLog() ...", "oneDNN custom
  operations are on", "Could not find cuda drivers"). Those ignore every environment variable and
  are written from C++ straight to file descriptor 2, so Python can't filter them: the only way is
  to point fd 2 elsewhere while ``import tensorflow`` runs. An import hook does that for the first
  import of ``tensorflow``, from wherever it comes (keras seeds TensorFlow's RNG even under JAX;
  tf2onnx; the ONNX export subprocess). See ``held_stderr`` for what keeps that safe.
- Python-side warnings of other libraries: TensorFlow's, absl's, tf2onnx's and matplotlib's loggers at ERROR,
  deprecation warnings raised outside kbench and keras' UserWarnings ignored.

kbench's own ``kbench: ...`` lines (the ``kbench`` logger, click.echo) are untouched.

This module is the one owner of file descriptor 2 (and 1): ``redirected`` is the only place kbench
points them elsewhere, for ``held_stderr`` (while TensorFlow loads) and ``output_to`` (a Ray task's
output into its log). Redirections nest as a stack: each saves the descriptors as they are when it
begins and puts exactly those back when it ends, innermost first, so ``import tensorflow`` inside a
Ray task's ``output_to`` is held and then written to the task's log, not the terminal. One ending out
of turn (two threads interleaving) is a RuntimeError, not a terminal silently left pointing at a
closed pipe.
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib.abc
import logging
import os
import subprocess
import sys
import threading
import warnings
from contextlib import contextmanager

VERBOSE_ENV = "KBENCH_VERBOSE"
QUIETED_MODULES = ("tensorflow",)  # top-level modules imported with fd 2 held
# JAX's logger stays: its one start-up warning ("a CUDA-enabled jaxlib is not installed") appears only
# on a machine whose GPU it can't use, which is worth seeing.
# matplotlib: "findfont: Font family ... not found. Falling back to DejaVu Sans" on a fresh font cache
QUIETED_LOGGERS = ("tensorflow", "absl", "tf2onnx", "matplotlib")
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_up(verbose_flag: bool = False) -> None:
    """Quiet this process (and, through the environment, its children) unless verbose.

    Call it before anything imports TensorFlow; calling it again does nothing more.
    """
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    if verbose():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")  # everything, unless the user chose a level
        return
    # Set, not defaulted: many shells export TF_CPP_MIN_LOG_LEVEL=2 (kbench.core.backend's own default too),
    # which still lets "E0000 ... failed call to cuInit" through. -v brings back the user's level.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in DEPRECATIONS:
        warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("default", category=category, module=r"kbench(\.|$)")  # ours still show
    # keras' advice to a user of its own API (the trainable state changed since compile, an input
    # structure, the weights ImageNet shapes load from): kbench drives keras and checks what matters itself
    warnings.filterwarnings("ignore", category=UserWarning, module=r"keras(\.|$)")
    if not any(isinstance(finder, _HeldImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HeldImport())


# The keeper of held stderr: a tiny process that reads everything written to fd 2 during the hold.
# It drops what came before DISCARD (the hold ended well); anything else (the import raised, or
# the process died mid-import) it writes to the real stderr when its input closes.
DISCARD = b"\n\0kbench: held stderr discarded\0\n"
_KEEPER = (
    "import sys\n"
    f"mark = {DISCARD!r}\n"
    "data = sys.stdin.buffer.read()\n"
    "sys.stderr.buffer.write(data.rsplit(mark, 1)[1] if mark in data else data)\n"
)


_REDIRECTIONS: list[object] = []  # the redirections in force, innermost last
_REDIRECTIONS_LOCK = threading.Lock()


@contextmanager
def redirected(target_fd: int, fds: tuple[int, ...] = (2,)):
    """Point the descriptors ``fds`` at ``target_fd`` for the block, then back to what they were."""
    _flush()
    token = object()
    with _REDIRECTIONS_LOCK:
        saved = [os.dup(fd) for fd in fds]
        for fd in fds:
            os.dup2(target_fd, fd)
        _REDIRECTIONS.append(token)
    try:
        yield
    finally:
        _flush()
        with _REDIRECTIONS_LOCK:
            in_turn = _REDIRECTIONS[-1] is token
            _REDIRECTIONS.remove(token)
            for fd, copy in zip(fds, saved):
                os.dup2(copy, fd)
                os.close(copy)
        if not in_turn:
            raise RuntimeError("file descriptor redirections ended out of turn (two threads redirecting at once)")


@contextmanager
def output_to(handle):
    """This process's stdout and stderr (Python's and the C libraries') into ``handle``, an open file."""
    with redirected(handle.fileno(), (1, 2)):
        with contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
            yield


@contextmanager
def held_stderr():
    """Point file descriptor 2 at a keeper process for the block, then back; what was written is
    dropped if the block ends well and shown otherwise.

    - fd 2 is restored whatever happens in the block (``finally``).
    - If the block raises (TensorFlow fails to import: a missing library, a broken install), the
      held text is written to the real stderr before the exception goes on.
    - If the process dies inside the block (TensorFlow aborts on a CPU without the instructions it
      was built for, a segfault in a shared library), Python can replay nothing itself; the keeper
      is another process, so it still writes the held text (the reason) when its input closes, and
      ``faulthandler`` writes the Python stack to the real stderr. A crash is never silent.
    - Without a keeper (it can't be started), nothing is held: noise rather than a lost message.
    - Other threads' stderr during the block is held too; TensorFlow is imported before kbench
      starts threads that write to stderr.
    """
    _flush()
    try:
        keeper = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _KEEPER], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
    except OSError:
        yield
        return
    real_stderr = os.fdopen(os.dup(2), "w")
    faults_were_on = faulthandler.is_enabled()
    try:
        with redirected(keeper.stdin.fileno()):
            faulthandler.enable(file=real_stderr)
            yield
            _flush()
            os.write(2, DISCARD)  # the block ended well: the keeper drops what it held
    finally:
        if faults_were_on:  # on fd 2: sys.stderr may have no descriptor (click's CliRunner, in tests)
            faulthandler.enable(file=2)
        else:
            faulthandler.disable()
        real_stderr.close()
        keeper.stdin.close()
        keeper.wait()  # its replay is on the terminal before a traceback follows


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass


class _HeldImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module in QUIETED_MODULES it asks the other finders and wraps
    the loader they return so that the module executes inside ``held_stderr``."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in QUIETED_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HeldLoader(spec.loader)
                return spec
        return None


class _HeldLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # The module carries the real loader from the start (importlib.resources and friends ask it).
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        with held_stderr():
            self.loader.exec_module(module)

    def __getattr__(self, name):  # is_package, get_resource_reader, ...: the real loader's
        return getattr(self.loader, name)
