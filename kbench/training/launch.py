"""``kbench launch``: N local processes of one training command, each with the cluster environment
(``kbench.training.distributed``) and its own rank and GPU; output relayed by rank, signals passed on,
the others stopped when one fails, and the first failure's exit status returned.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from kbench.core.config import check_bounds, option
from kbench.core.errors import KbenchError
from kbench.core.process import exit_status, orphan_proof
from kbench.training.distributed import ADDRESS, COUNT, INDEX, visible_gpus
from kbench.training.runs import ensure_writable_folder

GRACE_SECONDS = 10  # after asking the other processes to stop, before killing them


@dataclass
class LaunchConfig:
    """``kbench launch``: N local processes of one command, joined by the cluster environment."""

    processes: int = option(2, "Processes to start (each gets its own rank).", minimum=1)
    port: int | None = option(None, "Coordinator port on 127.0.0.1.", shown_default="a free one")
    log_dir: str | None = option(
        None, "Write each rank's output to LOG_DIR/rank-N.log instead of the terminal.", path=True
    )

    def check(self) -> "LaunchConfig":
        check_bounds(self, "processes")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise KbenchError(f"--port must be in 1..65535; got {self.port}")
        return self


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _check_port(port: int) -> int:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise KbenchError(f"--port {port} can't be used: {error.strerror}") from None
    return port


def resolve_command(command: list[str]) -> list[str]:
    """``kbench ...`` runs with this Python (the same install, even where the script isn't on PATH)."""
    if not command:
        raise KbenchError("give the command to launch after --, e.g. kbench launch -- kbench train ...")
    if os.path.basename(command[0]) == "kbench":
        return [sys.executable, "-m", "kbench", *command[1:]]
    import shutil

    if shutil.which(command[0]) is None:
        raise KbenchError(f"command not found: {command[0]}")
    return list(command)


def launch(config: LaunchConfig, command: list[str], echo=print) -> int:
    """Start ``config.processes`` copies of ``command`` on this machine, each with the cluster
    environment and its own rank; returns the first non-zero exit status (0 when all succeed).

    Output is streamed prefixed ``[rank N]`` (or to per-rank logs). When one process fails, the
    others are stopped (SIGTERM, then SIGKILL after a grace period); SIGINT / SIGTERM to the
    launcher is passed to every process once, and the same escalation follows. Each process dies
    with the launcher (``kbench.core.process.orphan_proof``: no ``preexec_fn``), and the threads that
    relay their output start once every process is running.
    """
    config.check()
    argv = orphan_proof(resolve_command(command))
    placement = rank_devices(config.processes)
    port = free_port() if config.port is None else _check_port(config.port)
    if config.log_dir:
        ensure_writable_folder(config.log_dir, "--log-dir")
    base = {**os.environ, ADDRESS: f"127.0.0.1:{port}", COUNT: str(config.processes), "PYTHONUNBUFFERED": "1"}
    group = _Ranks()
    previous = group.forward_signals()
    try:
        for rank in range(config.processes):
            log = os.path.join(config.log_dir, f"rank-{rank}.log") if config.log_dir else None
            group.start(argv, {**base, INDEX: str(rank), **placement[rank]}, log)
        readers = [] if config.log_dir else [group.relay(rank, echo) for rank in range(config.processes)]
        gpus = f", GPU {' / '.join(p['CUDA_VISIBLE_DEVICES'] for p in placement)}" if placement[0] else ""
        echo(f"kbench launch: {config.processes} processes, coordinator 127.0.0.1:{port}{gpus}")
        group.wait()
        for reader in readers:
            reader.join(timeout=5)
        return group.status()
    finally:
        group.kill_left()  # an exception on our side: no process outlives the launcher
        for number, handler in previous.items():
            signal.signal(number, handler)


class _Ranks:
    """``kbench launch``'s processes: started, stopped together, and their first failing status."""

    def __init__(self):
        self.children: list[subprocess.Popen] = []
        self.first: int | None = None  # the status to report: the first failure, or 128 + a signal
        self.stopping_since: float | None = None
        self.lock = threading.Lock()

    def start(self, argv: list[str], env: dict, log: str | None) -> None:
        output = open(log, "w") if log else subprocess.PIPE
        try:
            child = subprocess.Popen(
                argv,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C reaches them once, through us
                text=True,
                errors="replace",
            )
        except OSError as error:
            self.stop_all(signal.SIGTERM)
            raise KbenchError(f"can't start {argv[0]}: {error.strerror}") from None
        finally:
            if log:
                output.close()
        self.children.append(child)

    def relay(self, rank: int, echo) -> threading.Thread:
        reader = threading.Thread(
            target=_relay, args=(self.children[rank].stdout, f"[rank {rank}] ", echo), daemon=True
        )
        reader.start()
        return reader

    def stop_all(self, signal_number: int) -> None:
        with self.lock:
            if self.stopping_since is None:
                self.stopping_since = time.monotonic()
                for child in self.children:
                    if child.poll() is None:
                        try:
                            child.send_signal(signal_number)
                        except ProcessLookupError:
                            pass

    def forward_signals(self) -> dict:
        """SIGINT / SIGTERM to the launcher stop every process; returns the handlers to put back."""

        def forward(signal_number, frame):
            with self.lock:
                self.first = self.first or 128 + signal_number
            self.stop_all(signal_number)

        previous = {}
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                previous[number] = signal.signal(number, forward)
        return previous

    def wait(self) -> None:
        """Until every process has ended: one that fails stops the others, SIGKILL after the grace."""
        while any(child.poll() is None for child in self.children):
            for child in self.children:
                code = child.poll()
                if code not in (None, 0):
                    with self.lock:
                        self.first = self.first or exit_status(code)
                    self.stop_all(signal.SIGTERM)
            since = self.stopping_since
            if since is not None and time.monotonic() - since > GRACE_SECONDS:
                for child in self.children:
                    if child.poll() is None:
                        child.kill()
            time.sleep(0.1)

    def status(self) -> int:
        codes = [exit_status(child.returncode) for child in self.children]
        return self.first or next((code for code in codes if code), 0)

    def kill_left(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
                child.wait()


def rank_devices(processes: int, environ=None) -> list[dict]:
    """Each local rank's own GPU: ``{"CUDA_VISIBLE_DEVICES": id}`` for rank i (else every rank would
    see, and JAX or TensorFlow would take memory on, every GPU); ``{}`` each on a machine without one.
    More ranks than GPUs is refused in one line.

    >>> rank_devices(2, {"CUDA_VISIBLE_DEVICES": "2,3"})
    [{'CUDA_VISIBLE_DEVICES': '2'}, {'CUDA_VISIBLE_DEVICES': '3'}]
    """
    ids = visible_gpus(environ)
    if not ids:
        return [{} for _ in range(processes)]
    if processes > len(ids):
        raise KbenchError(
            f"--processes {processes} needs a GPU per process and this machine has {len(ids)} "
            f"(GPU {','.join(ids)}): give --processes {len(ids)} or fewer, or CUDA_VISIBLE_DEVICES= to run on the CPU"
        )
    return [{"CUDA_VISIBLE_DEVICES": ids[rank]} for rank in range(processes)]


def _relay(stream, prefix: str, echo) -> None:
    for line in stream:
        echo(prefix + line.rstrip("\n"))
    stream.close()
