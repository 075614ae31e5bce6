"""Where a study's backbone entries run: one after another in this process (``sequential``), or
as Ray tasks (``ray``), one per entry, each asking for a GPU where the cluster has GPUs.

Both run the function the study hands them (``kbench.study.study.member_row``: train or reuse, export,
time), so results, resume (a finished member is reused, keyed by its settings, data and weights) and
failure marking are the sequential study's. Under Ray each entry runs in a fresh worker process (``max_calls=1``:
no backend state or GPU memory carries over) whose output goes to ``OUT/logs/NAME.log``; the
study folder must be on storage every Ray node sees, which is checked before anything trains.
Ensembles and the submission run in the calling process once the entries are done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from kbench.core.config import option
from kbench.core.errors import KbenchError, TrainingInterrupted, first_line
from kbench.core.process import at_exit_now, stop_if_requested

log = logging.getLogger("kbench")

EXECUTORS = ("sequential", "ray")
LOGS = "logs"  # per-member logs of Ray tasks, in the study folder
PROBE = ".kbench-probe"


@dataclass
class ExecutorConfig:
    """``kbench bench --executor``: how the backbone entries run."""

    executor: str = option("sequential", "Run the backbone entries in turn, or as Ray tasks.", choices=EXECUTORS)
    address: str | None = option(
        None,
        "Ray cluster to join: auto or HOST:PORT (with --executor ray).",
        shown_default="a local Ray on this machine",
    )

    def check(self) -> "ExecutorConfig":
        if self.executor not in EXECUTORS:
            raise KbenchError(f"--executor must be one of {', '.join(EXECUTORS)}; got {self.executor!r}")
        if self.address and self.executor != "ray":
            raise KbenchError("--address joins a Ray cluster; it needs --executor ray")
        if self.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise KbenchError("--executor ray needs Ray: pip install 'kbench[ray]'")
        if self.address:  # before anything is written; Ray retries an unreachable cluster for minutes
            _check_reachable(_found_cluster() if self.address == "auto" else self.address)
        return self


def run_members(
    members: list,
    run_member: Callable[..., dict],
    time_member: Callable[[dict], None],
    out_dir: str,
    backend: str,
    verbose,
    echo,
    executor: ExecutorConfig,
) -> list[dict]:
    """The results rows of ``members`` (the study's backbone entries), in their order.

    ``run_member(member, verbose=..., timing=...)`` trains (or reuses), exports and, with ``timing``,
    times one entry into its row; ``time_member(row)`` times a finished row afterwards (Ray: in this
    process, once no entry trains beside it). Under Ray, ``run_member`` is sent to the workers, so it
    must pickle (a module-level function, or a ``functools.partial`` of one)."""
    if executor.executor == "ray":
        return _run_on_ray(members, run_member, time_member, out_dir, backend, echo, executor.address)
    rows = []
    for index, member in enumerate(members, 1):
        stop_if_requested()
        echo(f"[{index}/{len(members)}] {member.name}: training, exporting, timing")
        rows.append(run_member(member, verbose=verbose))
    return rows


# -- Ray ------------------------------------------------------------------------------------------------


def _member_task(run_member, member, out_dir: str, backend: str) -> dict:
    """One backbone entry in a Ray worker: its output to OUT/logs/NAME.log, then ``run_member``."""
    log_path = os.path.join(out_dir, LOGS, f"{member.name}.log")
    with open(log_path, "a", buffering=1) as handle, _output_to(handle):
        print(f"kbench: {member.name} on {socket.gethostname()} (pid {os.getpid()})", flush=True)
        from kbench.training.distributed import CLUSTER_VARIABLES

        for name in (*CLUSTER_VARIABLES, "SLURM_STEP_NUM_TASKS"):  # each entry trains as one process
            os.environ.pop(name, None)
        from kbench.core.backend import use_backend
        from kbench.core.process import set_up

        use_backend(backend)  # before keras is imported in this worker
        set_up()
        started = time.perf_counter()
        row = run_member(member, verbose=0, timing=False)
        print(f"kbench: {member.name}: {row['status']} in {time.perf_counter() - started:.1f} s", flush=True)
        return row


@contextlib.contextmanager
def _output_to(handle):
    """This process's stdout and stderr (Python's and the C libraries') into ``handle``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)
    try:
        with contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _probe_task(out_dir: str, token: str) -> str:
    """Read the driver's token in the study folder and write it back under this node's name."""
    try:
        with open(os.path.join(out_dir, f"{PROBE}-{token}"), encoding="utf-8") as handle:
            seen = handle.read()
        path = os.path.join(out_dir, f"{PROBE}-{token}-{uuid.uuid4().hex[:8]}")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(seen)
    except OSError as error:
        return f"error:{socket.gethostname()}: {error.strerror or error}"
    return path


def _connect(address: str | None) -> None:
    import ray

    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        if address:
            ray.init(address=address, **quiet)
        else:  # Ray's embedded default: a local instance for this study, ended with it
            here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # workers import this kbench
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
            ray.init(num_cpus=os.cpu_count() or 1, **quiet)
            at_exit_now(ray.shutdown)  # a stopped command (exit_now) ends its local Ray first
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise KbenchError(f"can't start or join {where}: {first_line(error, 200)}") from None


def _found_cluster() -> str:
    """The HOST:PORT ``--address auto`` means (RAY_ADDRESS, the latest cluster this machine started,
    or a running one, as ray.init finds it); KbenchError when there is none."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        address = canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError) as error:
        address, reason = None, f" ({first_line(error, 120)})"
    else:
        reason = ""
    if not address:
        raise KbenchError(f"--address auto found no running Ray cluster{reason}; start one with `ray start --head`")
    return address


def _check_reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise KbenchError(f"--address {address!r} must be auto or HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise KbenchError(
            f"can't reach the Ray cluster at {address} ({reason}); is `ray start --head` running there?"
        ) from None


def _check_storage(out_dir: str) -> None:
    """Every alive Ray node reads a token the driver wrote in the study folder and writes it back."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    source = os.path.join(out_dir, f"{PROBE}-{token}")
    with open(source, "w", encoding="utf-8") as handle:
        handle.write(token)
    probe = ray.remote(num_cpus=0)(_probe_task)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    try:
        answers = ray.get(
            [
                probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
                    out_dir, token
                )
                for node in nodes
            ],
            timeout=120,
        )
        for node, answer in zip(nodes, answers):
            host = node.get("NodeManagerHostname") or node.get("NodeManagerAddress")
            if answer.startswith("error:"):
                raise KbenchError(
                    f"--out {out_dir} can't be used from Ray node {host} ({answer.split(': ', 1)[-1]}); "
                    "the study folder must be on storage every node sees"
                )
            try:
                with open(answer, encoding="utf-8") as handle:
                    same = handle.read() == token
            except OSError:
                same = False
            if not same:
                raise KbenchError(
                    f"--out {out_dir} on Ray node {host} is not the folder this machine sees; "
                    "the study folder must be on storage every node sees"
                )
    except ray.exceptions.GetTimeoutError:
        raise KbenchError(f"Ray nodes didn't answer the --out {out_dir} check within 2 minutes") from None
    finally:
        for name in os.listdir(out_dir):
            if name.startswith(f"{PROBE}-{token}"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(out_dir, name))


def _run_on_ray(
    members: list, run_member, time_member, out_dir: str, backend: str, echo, address: str | None
) -> list[dict]:
    import ray

    out_dir = os.path.abspath(out_dir)  # workers start elsewhere
    os.makedirs(os.path.join(out_dir, LOGS), exist_ok=True)
    several = [m for m in members if m.train.devices not in (None, "1")]
    if several:
        raise KbenchError(
            f"--executor ray gives each backbone entry one device; {several[0].name} asks for "
            f"devices = {several[0].train.devices!r} (drop it, or use the sequential executor)"
        )
    _connect(address)
    try:
        _check_storage(out_dir)
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(max_calls=1, max_retries=0)(_member_task).options(
            num_cpus=1, num_gpus=1 if gpus else 0, name="kbench-member"
        )
        cpus = int(ray.cluster_resources().get("CPU", 0))
        echo(
            f"ray: {len(members)} backbone entries as tasks on {len(ray.nodes())} node(s), {cpus} CPUs, "
            f"{int(gpus)} GPUs; logs in {os.path.join(out_dir, LOGS)}"
        )
        pending = {}
        for member in members:
            member = dataclasses.replace(
                member, train=dataclasses.replace(member.train, data=os.path.abspath(member.train.data))
            )
            pending[task.remote(run_member, member, out_dir, backend)] = member.name
        rows = {}
        try:
            while pending:
                finished, _ = ray.wait(list(pending), num_returns=1)
                name = pending.pop(finished[0])
                try:
                    rows[name] = ray.get(finished[0])
                except ray.exceptions.RayError as error:  # the worker died (killed, out of memory)
                    cause = getattr(error, "cause", None)
                    if isinstance(cause, TrainingInterrupted | KeyboardInterrupt):
                        number = getattr(cause, "signal_number", signal.SIGINT)
                        raise TrainingInterrupted(f"{name} was interrupted; its checkpoint is kept", number) from None
                    rows[name] = _failed_row(members, out_dir, name, error)
                    log.warning("%s %s", name, rows[name]["status"])
                echo(f"[{len(rows)}/{len(members)}] {name}: {rows[name]['status']}")
        except (KeyboardInterrupt, TrainingInterrupted):
            for reference in pending:
                ray.cancel(reference, force=True)
            raise
    finally:
        ray.shutdown()
    # Timed here, one model at a time, once no entry trains: a timing taken while other entries train
    # on the same machine would be wrong, and the report's machine is this one.
    ordered = [rows[member.name] for member in members]
    for index, row in enumerate(ordered, 1):
        if row["status"] == "ok":
            echo(f"[{index}/{len(ordered)}] {row['name']}: timing")
        time_member(row)
    return ordered


def _failed_row(members: list, out_dir: str, name: str, error: BaseException) -> dict:
    member = next(m for m in members if m.name == name)
    cause = getattr(error, "cause", None) or error
    return {
        "name": name,
        "kind": "backbone",
        "backbone": member.train.backbone,
        "folder": os.path.join("runs", name),
        "status": f"failed: {first_line(cause, 200, named=True)} (see {os.path.join(out_dir, LOGS, name + '.log')})",
    }
