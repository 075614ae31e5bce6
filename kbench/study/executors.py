"""Where a study's backbone entries run: one after another in this process (``sequential``), or
as Ray tasks (``ray``), one per entry, each asking for the devices it trains on (its ``devices``
GPUs where the cluster has GPUs, else the CPUs of a node).

Both run the function the study hands them (``kbench.study.stages.member_row``: train or reuse, export,
time), so results, resume (a finished member is reused, keyed by its settings, data and weights) and
failure marking are the sequential study's. Under Ray each entry runs in a fresh worker process (``max_calls=1``:
no backend state or GPU memory carries over) whose output goes to ``OUT/logs/NAME.log``; the
study folder must be on storage every Ray node sees, and every node must run this kbench, which is
checked before anything trains. An entry whose node is lost is started again elsewhere and resumes
from its checkpoint in the shared run folder (``NODE_LOSSES`` times at most); one whose worker
process dies (killed for memory, a crash) once more only (``WORKER_CRASHES``): a second death is
the entry's own. Ensembles and the submission run in the calling process once the entries are done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from kbench.core import files
from kbench.core.config import option
from kbench.core.errors import KbenchError, TrainingInterrupted, first_line
from kbench.core.process import stop_if_requested
from kbench.core.quiet import output_to
from kbench.study.cluster import asking, check_nodes, check_reachable, connect, found_cluster, placement

log = logging.getLogger("kbench")

EXECUTORS = ("sequential", "ray")
LOGS = "logs"  # per-member logs of Ray tasks, in the study folder
OWNER = ".kbench-driver"  # the token of the driver that owns the study folder now
# Starts of an entry beyond its first: a lost node (a preempted or rebooted machine, a raylet killed
# for memory) is the cluster's failure, so the entry resumes elsewhere, up to 3 times (a fourth loss
# of the same entry points at the entry); a worker process that died under it (the kernel's OOM killer,
# a crash in a library) may be the entry's own doing, so it gets one more start: dying twice marks it failed.
NODE_LOSSES = 3
WORKER_CRASHES = 1
# How long a restarted entry waits for its run folder's lock: on NFS a dead node's lock lasts until
# its lease expires (90 s by default); the lock keeps a writer still alive behind a partition out.
LOCK_WAIT_SECONDS = 150


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
            check_reachable(found_cluster() if self.address == "auto" else self.address)
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


def _member_task(run_member, member, out_dir: str, backend: str, owner: str, start: int) -> dict:
    """One backbone entry in a Ray worker: its output to OUT/logs/NAME.log, then ``run_member``.
    Returns its row and where and when it trained; None when the study folder has a new owner (this
    task outlived its driver: it writes nothing)."""
    import ray

    if _owner(out_dir) != owner:
        return None
    log_path = os.path.join(out_dir, LOGS, f"{member.name}.log")
    node = ray.get_runtime_context().get_node_id()
    with open(log_path, "a", buffering=1) as handle, output_to(handle):  # quiet.py owns fd 1 and 2
        print(
            f"kbench: {member.name} on {socket.gethostname()} (pid {os.getpid()}, Ray node {node[:12]}, "
            f"start {start}, GPUs {os.environ.get('CUDA_VISIBLE_DEVICES', 'none')})",
            flush=True,
        )
        from kbench.training.distributed import CLUSTER_VARIABLES

        for name in (*CLUSTER_VARIABLES, "SLURM_STEP_NUM_TASKS"):  # each entry trains as one process
            os.environ.pop(name, None)
        from kbench.core.backend import use_backend
        from kbench.core.process import set_up

        use_backend(backend)  # before keras is imported in this worker
        set_up()
        started = time.time()
        # a restarted entry waits for its run folder: a lost node's lock may outlive it for a while
        row = run_member(member, verbose=0, timing=False, lock_wait_seconds=LOCK_WAIT_SECONDS if start > 1 else 0)
        print(f"kbench: {member.name}: {row['status']} in {time.time() - started:.1f} s", flush=True)
        return {"row": row, "node": node, "started": started, "ended": time.time()}


def _owner(out_dir: str) -> str | None:
    try:
        with open(os.path.join(out_dir, OWNER), encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return None


def _run_on_ray(
    members: list, run_member, time_member, out_dir: str, backend: str, echo, address: str | None
) -> list[dict]:
    import ray

    out_dir = os.path.abspath(out_dir)  # workers start elsewhere
    os.makedirs(os.path.join(out_dir, LOGS), exist_ok=True)
    members = [
        dataclasses.replace(member, train=dataclasses.replace(member.train, data=os.path.abspath(member.train.data)))
        for member in members
    ]
    connect(address, echo)
    try:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        asked = placement(members, nodes)
        check_nodes(out_dir)
        owner = uuid.uuid4().hex  # tasks of an earlier driver of this folder, still queued, see it and leave
        files.write_text(os.path.join(out_dir, OWNER), owner)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 0))
        each = sorted({asking(resources) for resources in asked.values()})
        echo(
            f"ray: {len(members)} backbone entries as tasks on {len(nodes)} node(s), {cpus} CPUs, {gpus} GPUs "
            f"(an entry asks for {' or '.join(each)}); logs in {os.path.join(out_dir, LOGS)}"
        )
        results = _gather(members, asked, run_member, out_dir, backend, owner, echo)
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
    rows = {name: result["row"] for name, result in results.items()}
    _mark_shared_nodes(results)
    # Timed here, one model at a time, once no entry trains: a timing taken while other entries train
    # on the same machine would be wrong, and the report's machine is this one.
    ordered = [rows[member.name] for member in members]
    for index, row in enumerate(ordered, 1):
        if row["status"] == "ok":
            echo(f"[{index}/{len(ordered)}] {row['name']}: timing")
        time_member(row)
    return ordered


def _gather(members: list, asked: dict, run_member, out_dir: str, backend: str, owner: str, echo) -> dict:
    """Start every entry and wait for them; an entry whose node was lost, or whose worker died, is
    started again (``NODE_LOSSES``, ``WORKER_CRASHES``). Returns each entry's task result by name."""
    import ray

    task = ray.remote(max_calls=1, max_retries=0)(_member_task)
    by_name = {member.name: member for member in members}
    starts = {name: 0 for name in by_name}
    losses = {name: {"node": 0, "worker": 0} for name in by_name}

    def submit(name: str):
        starts[name] += 1
        options = dict(name=f"kbench-member-{name}", **asked[name])
        return task.options(**options).remote(run_member, by_name[name], out_dir, backend, owner, starts[name])

    pending = {submit(name): name for name in by_name}
    results = {}
    try:
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(finished[0])
            try:
                results[name] = ray.get(finished[0])
                if results[name] is None:  # can't be: this driver's token stays while it runs
                    raise KbenchError(f"{name}: the study folder {out_dir} was taken over by another kbench")
            except ray.exceptions.RayError as error:
                cause = getattr(error, "cause", None)
                if isinstance(cause, TrainingInterrupted | KeyboardInterrupt):
                    number = getattr(cause, "signal_number", signal.SIGINT)
                    raise TrainingInterrupted(f"{name} was interrupted; its checkpoint is kept", number) from None
                lost = _lost(error)
                if lost and losses[name][lost] < (NODE_LOSSES if lost == "node" else WORKER_CRASHES):
                    losses[name][lost] += 1
                    what = "its Ray node was lost" if lost == "node" else "its worker process died"
                    echo(f"{name}: {what}; starting it again, from its last checkpoint (start {starts[name] + 1})")
                    log.warning("%s: %s (%s)", name, what, first_line(error, 200))
                    pending[submit(name)] = name
                    continue
                results[name] = {"row": _failed_row(by_name[name], out_dir, error, starts[name])}
                log.warning("%s %s", name, results[name]["row"]["status"])
            row = results[name]["row"]
            if starts[name] > 1:
                row["ray_starts"] = starts[name]
            echo(f"[{len(results)}/{len(members)}] {name}: {row['status']}")
    except (KeyboardInterrupt, TrainingInterrupted):
        for reference in pending:
            with contextlib.suppress(Exception):
                ray.cancel(reference, force=True)
        raise
    return results


def _lost(error: BaseException) -> str | None:
    """ "node" when the task's node died, "worker" when its worker process did (killed for memory,
    crashed), else None (the entry's own error: not worth another start)."""
    import ray

    if isinstance(error, ray.exceptions.NodeDiedError | ray.exceptions.LocalRayletDiedError):
        return "node"
    if isinstance(error, ray.exceptions.WorkerCrashedError | ray.exceptions.OutOfMemoryError):
        return "worker"
    return None


def _mark_shared_nodes(results: dict) -> None:
    """Each row whose training overlapped another entry's on the same Ray node names those entries
    (``trained_beside``): its epoch times were taken on a shared machine."""
    timed = {name: result for name, result in results.items() if "node" in result}
    for name, result in timed.items():
        beside = sorted(
            other
            for other, them in timed.items()
            if other != name
            and them["node"] == result["node"]
            and them["started"] < result["ended"]
            and result["started"] < them["ended"]
        )
        if beside:
            result["row"]["trained_beside"] = beside


def _failed_row(member, out_dir: str, error: BaseException, starts: int) -> dict:
    cause = getattr(error, "cause", None) or error
    how = f" (started {starts} times)" if starts > 1 else ""
    return {
        "name": member.name,
        "kind": "backbone",
        "backbone": member.train.backbone,
        "folder": os.path.join("runs", member.name),
        "status": f"failed: {first_line(cause, 200, named=True)}{how} "
        f"(see {os.path.join(out_dir, LOGS, member.name + '.log')})",
    }
