"""The Ray cluster a study's entries run on (``kbench bench --executor ray``): joining one, or
starting kbench's own local Ray beside any other; checking that every node sees the study folder and
runs this kbench; and what each entry asks a node for (``placement``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import uuid

from kbench.core.errors import KbenchError, first_line
from kbench.core.process import at_exit_now

log = logging.getLogger("kbench")

PROBE = ".kbench-probe"


def _kbench_identity() -> tuple[str, str]:
    """This kbench's version and a hash of its source: a node running another kbench would train
    other models (or none) under the same names."""
    from kbench.core.version import __version__

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, folders, names in sorted(os.walk(root)):
        folders.sort()
        for name in sorted(names):
            if name.endswith((".py", ".toml")):
                digest.update(os.path.relpath(os.path.join(folder, name), root).encode())
                with open(os.path.join(folder, name), "rb") as handle:
                    digest.update(handle.read())
    return __version__, digest.hexdigest()[:12]


def _probe_task(out_dir: str, token: str) -> str:
    """Read the driver's token in the study folder and write it back under this node's name; then
    this node's kbench version and source hash, after a tab."""
    try:
        with open(os.path.join(out_dir, f"{PROBE}-{token}"), encoding="utf-8") as handle:
            seen = handle.read()
        path = os.path.join(out_dir, f"{PROBE}-{token}-{uuid.uuid4().hex[:8]}")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(seen)
    except OSError as error:
        return f"error:{socket.gethostname()}: {error.strerror or error}"
    return path + "\t" + " ".join(_kbench_identity())


def connect(address: str | None, echo) -> None:
    import ray

    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:  # our own local Ray for this study, ended with it, whatever other Ray runs here
            other = _other_local_ray()
            if other:
                echo(f"ray: another Ray runs on this machine ({other}); kbench starts its own beside it "
                     "(--address auto joins that one)")  # fmt: skip
            here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # workers import this kbench
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
            # "local": never the cluster RAY_ADDRESS or /tmp/ray/ray_current_cluster names; on loopback,
            # as a Ray for one machine needs no network (Ray has no authentication)
            ray.init(address="local", num_cpus=os.cpu_count() or 1, _node_ip_address="127.0.0.1", **quiet)
            at_exit_now(ray.shutdown)  # a stopped command (exit_now) ends its local Ray first
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise KbenchError(f"can't start or join {where}: {first_line(error, 200)}") from None
    finally:
        # ray.init makes SIGTERM a sys.exit: kbench's own handler stops the study as Ctrl-C does
        # (the checkpoint kept, exit 143), so it is put back
        if sigterm is not None and signal.getsignal(signal.SIGTERM) is not sigterm:
            signal.signal(signal.SIGTERM, sigterm)


def _other_local_ray() -> str | None:
    """The address of a Ray a plain ``ray.init()`` would join here (RAY_ADDRESS, or the cluster
    ``ray start`` or a test's cluster last wrote to /tmp/ray), if it answers."""
    from ray._private.utils import read_ray_address

    address = os.environ.get("RAY_ADDRESS") or read_ray_address()
    if not address or "://" in address:
        return address or None
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except (OSError, ValueError):
        return None
    return address


def found_cluster() -> str:
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


def check_reachable(address: str) -> None:
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


def check_nodes(out_dir: str) -> None:
    """Every alive Ray node reads a token the driver wrote in the study folder and writes it back,
    and runs this kbench."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    source = os.path.join(out_dir, f"{PROBE}-{token}")
    with open(source, "w", encoding="utf-8") as handle:
        handle.write(token)
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_task)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    version, source_hash = _kbench_identity()
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
            path, _, identity = answer.partition("\t")
            try:
                with open(path, encoding="utf-8") as handle:
                    same = handle.read() == token
            except OSError:
                same = False
            if not same:
                raise KbenchError(
                    f"--out {out_dir} on Ray node {host} is not the folder this machine sees; "
                    "the study folder must be on storage every node sees"
                )
            their_version, their_hash = (identity.split() + ["?", "?"])[:2]
            if their_version != version:
                raise KbenchError(
                    f"Ray node {host} runs kbench {their_version}, this machine {version}; "
                    "install the same kbench on every node"
                )
            if their_hash != source_hash:
                log.warning("Ray node %s runs kbench %s from other source files than this machine's", host, version)
    except (ray.exceptions.RayError, ModuleNotFoundError) as error:
        if isinstance(error, ray.exceptions.GetTimeoutError):
            raise KbenchError(f"Ray nodes didn't answer the --out {out_dir} check within 2 minutes") from None
        raise KbenchError(
            f"a Ray node can't run kbench ({first_line(getattr(error, 'cause', None) or error, 200, named=True)}); "
            "install the same kbench on every node"
        ) from None
    finally:
        for name in os.listdir(out_dir):
            if name.startswith(f"{PROBE}-{token}"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(out_dir, name))


def placement(members: list, nodes: list[dict]) -> dict[str, dict]:
    """What each entry asks Ray for, by name, on the alive ``nodes`` (``ray.nodes()``): with GPUs, its
    ``devices`` GPUs (one unless it says more; ``all``: the most one node has) and one CPU; on a
    CPU-only cluster the CPUs of the smallest node, since TensorFlow, JAX and the image loader use
    every core of the node an entry trains on. Refuses what no node can hold, in one line."""
    from kbench.training.devices import count_devices

    gpus = [int(node["Resources"].get("GPU", 0)) for node in nodes]
    cpus = [int(node["Resources"].get("CPU", 0)) for node in nodes if node["Resources"].get("CPU", 0) >= 1]
    asked = {}
    for member in members:
        if max(gpus, default=0):
            count = count_devices(member.train.devices, max(gpus))
            if count > 1 and member.train.batch_size % count:
                raise KbenchError(
                    f"{member.name}: --batch-size {member.train.batch_size} must be a multiple of its "
                    f"{count} GPUs (the global batch)"
                )
            asked[member.name] = {"num_gpus": count, "num_cpus": 1}
        else:
            if member.train.devices != "all" and count_devices(member.train.devices, 10**6) > 1:
                raise KbenchError(
                    f"{member.name} asks for devices = {member.train.devices!r}: GPUs, and this Ray cluster "
                    "has none (on CPUs an entry trains on one node's cores)"
                )
            if not cpus:
                raise KbenchError("the Ray cluster has no node with a CPU or a GPU to train on")
            asked[member.name] = {"num_gpus": 0, "num_cpus": min(cpus)}
    return asked


def asking(resources: dict) -> str:
    if resources["num_gpus"]:
        return f"{resources['num_gpus']} GPU{'s' if resources['num_gpus'] > 1 else ''}"
    return f"{resources['num_cpus']} CPU{'s' if resources['num_cpus'] > 1 else ''}"
