"""Several training processes as one: the cluster environment, JAX's initialisation, and what the
processes agree on (a refusal, a stop request, leaving together). ``kbench launch``, which starts N
local processes with that environment, is ``kbench.training.launch``.

The environment is the same everywhere (``kbench launch``, SLURM, Kubernetes; see docs/backends-and-devices.md)::

    JAX_COORDINATOR_ADDRESS   host:port of process 0's coordinator
    JAX_NUM_PROCESSES         how many processes train together
    JAX_PROCESS_ID            this process's number, 0 .. N-1

Under SLURM without those variables, JAX reads SLURM's own (``SLURM_NTASKS`` > 1). Multi-process
training runs under JAX only: Keras 3's TensorFlow trainer distributes a ``PyDataset`` with
``experimental_distribute_dataset`` (keras/src/backend/tensorflow/trainer.py), which under
``MultiWorkerMirroredStrategy`` shards a generator by *data*, so every worker would decode every
image of every batch; and the strategy must exist before TensorFlow starts, which kbench's lazy
backend can't promise. kbench refuses it in one line rather than train something else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kbench.core.errors import KbenchError, first_line

ADDRESS, COUNT, INDEX = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
CLUSTER_VARIABLES = (ADDRESS, COUNT, INDEX)
# A process that finishes first waits this long at JAX's shutdown barrier for the others: process 0
# evaluates and saves the model alone after the last epoch, which can take minutes on a large model.
SHUTDOWN_SECONDS = 1800

_initialized = False


@dataclass(frozen=True)
class Cluster:
    """The processes of one training run, as the environment describes them."""

    address: str | None  # None: JAX reads SLURM's variables itself
    count: int
    index: int


def cluster_from_environment(environ=None) -> Cluster | None:
    """The cluster this process belongs to, or None for a single process; KbenchError in one line
    for an environment that is half set or inconsistent.

    >>> cluster_from_environment({ADDRESS: "h0:1234", COUNT: "2", INDEX: "1"})
    Cluster(address='h0:1234', count=2, index=1)
    """
    environ = os.environ if environ is None else environ
    given = {name: environ.get(name, "").strip() for name in CLUSTER_VARIABLES}
    if not any(given.values()):
        # Inside an srun step of several tasks; SLURM_NTASKS alone is set in any sbatch --ntasks job,
        # including its batch script and processes it starts some other way (a Ray worker).
        step = _whole(environ.get("SLURM_STEP_NUM_TASKS", "1"), "SLURM_STEP_NUM_TASKS")
        if step > 1 and _whole(environ.get("SLURM_NTASKS", "1")) > 1:
            return Cluster(None, step, _whole(environ.get("SLURM_PROCID", "0"), "SLURM_PROCID"))
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise KbenchError(f"multi-process training needs {', '.join(CLUSTER_VARIABLES)}; {', '.join(missing)} not set")
    count, index = _whole(given[COUNT], COUNT), _whole(given[INDEX], INDEX)
    if count < 1 or not 0 <= index < count:
        raise KbenchError(f"{INDEX}={index} must be in 0..{count - 1} ({COUNT}={count})")
    host, _, port = given[ADDRESS].rpartition(":")
    if not host or not port.isdigit():
        raise KbenchError(f"{ADDRESS}={given[ADDRESS]!r} must be host:port")
    return Cluster(given[ADDRESS], count, index) if count > 1 else None


def _whole(text: str, name: str = "SLURM_NTASKS") -> int:
    try:
        return int(text)
    except ValueError:
        raise KbenchError(f"{name}={text!r} must be a whole number") from None


def initialize(backend: str) -> Cluster | None:
    """Join the cluster the environment describes (once per process, before JAX starts); returns it.

    Under TensorFlow a cluster environment (or a TF_CONFIG naming several workers) is refused."""
    global _initialized
    cluster = cluster_from_environment()
    if backend != "jax":
        if cluster or _tf_config_workers() > 1:
            raise KbenchError(
                "multi-process training runs under JAX only (Keras 3's TensorFlow trainer would make "
                "every worker decode every batch); use --backend jax, or one process with --devices all"
            )
        return None
    if cluster is None or _initialized:
        return cluster
    import jax

    if not jax.distributed.is_initialized():  # the user's own code may have done it
        if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":  # CPU processes reduce over gloo
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        arguments = {} if cluster.address is None else dict(num_processes=cluster.count, process_id=cluster.index)
        local = slurm_local_devices()
        if local is not None:
            arguments["local_device_ids"] = local
        try:
            jax.distributed.initialize(cluster.address, shutdown_timeout_seconds=SHUTDOWN_SECONDS, **arguments)
        except RuntimeError as error:
            raise KbenchError(
                f"can't join the training cluster at {cluster.address}: {first_line(error, 200)}"
            ) from None
        if local is not None and jax.local_device_count() != len(local):
            raise KbenchError(
                f"JAX sees {jax.local_device_count()} GPUs on this node where {len(local)} are visible; "
                "check --gpus-per-task / CUDA_VISIBLE_DEVICES in the SLURM job"
            )
    _initialized = True
    return cluster


def _tf_config_workers() -> int:
    import json

    try:
        workers = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {}).get("worker", [])
    except (ValueError, AttributeError):
        raise KbenchError("TF_CONFIG is not valid JSON") from None
    return len(workers) if isinstance(workers, list) else 0


def process_index() -> int:
    """This process's number among those training together (0 when alone)."""
    if not _initialized:
        return 0
    import jax

    return jax.process_index()


def process_count() -> int:
    if not _initialized:
        return 1
    import jax

    return jax.process_count()


def agree(ok: bool, what: str) -> None:
    """Process 0 decides (``ok``); the others learn it. Call it on every process at the same point:
    the others stop here in one line when process 0 refused, instead of waiting in a collective."""
    if process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    decided = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
    if not decided and process_index() != 0:
        raise KbenchError(f"process 0 refused {what}; see its message")


def same_everywhere(values: list[int], what: str) -> None:
    """Every process holds the same small integers ``values``; otherwise every process stops here with
    the same one-line error (an all-gather, so call it on every process at the same point)."""
    if process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(values, dtype=np.int32)))
    rows = {tuple(row) for row in gathered.reshape(process_count(), -1).tolist()}
    if len(rows) > 1:
        raise KbenchError(
            f"the processes disagree on {what} ({' vs '.join(map(str, sorted(rows)))}); "
            "is the run folder on storage every process sees, and up to date?"
        )


def largest_everywhere(value: int) -> int:
    """The largest of every process's ``value`` (an all-gather: call it on every process at the same
    point); ``value`` itself when alone. Training asks it whether any process was told to stop."""
    if process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


EXIT_BARRIER_SECONDS = 5


def leave() -> None:
    """Before a process of several exits early (stopped or refused): wait a little for the others to
    get here, then disconnect together. Process 0 runs JAX's coordination service; leaving before the
    others disconnect makes their JAX abort with a C++ stack trace instead of their own line. A process
    that leaves alone (the others are still working) waits EXIT_BARRIER_SECONDS, not the shutdown's 30
    minutes: ``kbench launch`` then stops the rest."""
    if not _initialized:
        return
    try:
        from jax._src import distributed as jax_distributed

        client = jax_distributed.global_state.client
        if client is None:
            return
        client.wait_at_barrier("kbench-leave", EXIT_BARRIER_SECONDS * 1000)
        jax_distributed.global_state.shutdown()
    except Exception:  # the others didn't come (or already left): exit without them
        pass


def visible_gpus(environ=None) -> list[str]:
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES's when set ([] when it hides them all),
    else 0 .. N-1 for the N GPUs nvidia-smi lists."""
    from kbench.core.machine import gpu_details

    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [part.strip() for part in visible.split(",") if part.strip()]
        return [] if ids[:1] == ["-1"] else ids
    return [str(index) for index in range(len(gpu_details()))]


def slurm_local_devices(environ=None) -> list[int] | None:
    """The local device ids to give ``jax.distributed.initialize`` in a SLURM job. JAX's SLURM
    detection (even with the three variables set) assumes one task per GPU and gives each process
    only GPU SLURM_LOCALID, so the documented recipe of one task per node would train on GPU 0 of
    each node: there every visible GPU is this process's. None (JAX's own choice) outside SLURM, with
    JAX_LOCAL_DEVICE_IDS set, with several tasks per node that each see several GPUs, or no GPU.

    >>> slurm_local_devices({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2",
    ...                      "SLURM_LOCALID": "0", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    [0, 1, 2, 3]
    """
    environ = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in environ or environ.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    ids = visible_gpus(environ)
    tasks, nodes = environ.get("SLURM_STEP_NUM_TASKS", "1"), environ.get("SLURM_STEP_NUM_NODES", "1")
    if not ids or not (tasks == nodes or len(ids) == 1):
        return None
    return list(range(len(ids)))
