"""The study on several Ray nodes: a head and two worker nodes as separate raylets on this machine
(``ray.cluster_utils.Cluster``, loopback only), each with its own resources. The cluster tests cost
minutes on 2 cores: they are ``heavy`` (``make test-heavy``); the placement rule is checked here in the
default tier."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest

from kbench.core.errors import KbenchError
from kbench.study.cluster import placement

from conftest import REPO, run_process

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only


def _member(name, devices=None, batch_size=16):
    return SimpleNamespace(name=name, train=SimpleNamespace(devices=devices, batch_size=batch_size))


def _node(cpus, gpus=0):
    return {"Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


def test_placement_asks_for_the_gpus_an_entry_trains_on_or_a_nodes_cpus():
    gpu_nodes = [_node(0), _node(16, 8), _node(16, 4)]  # a head without CPUs, two GPU nodes
    asked = placement([_member("one"), _member("two", "2"), _member("all", "all")], gpu_nodes)
    assert asked == {
        "one": {"num_gpus": 1, "num_cpus": 1},
        "two": {"num_gpus": 2, "num_cpus": 1},
        "all": {"num_gpus": 8, "num_cpus": 1},  # the most one node has
    }
    with pytest.raises(KbenchError, match="only 8 device"):
        placement([_member("big", "16")], gpu_nodes)
    with pytest.raises(KbenchError, match="multiple of its 2 GPUs"):
        placement([_member("odd", "2", batch_size=15)], gpu_nodes)
    cpu_nodes = [_node(0), _node(8), _node(4)]  # each entry uses every core of its node: the smallest's
    assert placement([_member("one"), _member("all", "all")], cpu_nodes) == {
        "one": {"num_gpus": 0, "num_cpus": 4},
        "all": {"num_gpus": 0, "num_cpus": 4},
    }
    with pytest.raises(KbenchError, match="asks for devices = '2': GPUs, and this Ray cluster has none"):
        placement([_member("two", "2")], cpu_nodes)


def test_a_lost_node_or_a_dead_worker_starts_an_entry_again_its_own_error_does_not():
    ray_errors = pytest.importorskip("ray.exceptions")  # the optional extra kbench[ray]

    from kbench.study.executors import NODE_LOSSES, WORKER_CRASHES, _lost

    assert _lost(ray_errors.NodeDiedError("the node died")) == "node"
    assert _lost(ray_errors.WorkerCrashedError()) == "worker"  # the OOM killer, a segfault
    assert _lost(ray_errors.OutOfMemoryError("Ray's memory monitor")) == "worker"
    own = ray_errors.RayTaskError("member", "Traceback ...", ValueError("bad input"))
    assert _lost(own) is None
    assert (NODE_LOSSES, WORKER_CRASHES) == (3, 1)  # docs/study.md says so


def test_rows_of_entries_that_trained_side_by_side_on_a_node_name_each_other():
    from kbench.study.executors import _mark_shared_nodes

    def result(node, started, ended):
        return {"row": {}, "node": node, "started": started, "ended": ended}

    results = {"a": result("n1", 0, 10), "b": result("n1", 5, 15), "c": result("n1", 15, 20), "d": result("n2", 0, 20)}
    _mark_shared_nodes(results)
    assert {name: r["row"].get("trained_beside") for name, r in results.items()} == {
        "a": ["b"],
        "b": ["a"],
        "c": None,  # after b, on the same node: alone
        "d": None,  # on another node
    }


def test_a_task_of_an_earlier_driver_writes_nothing_in_a_folder_with_a_new_owner(tmp_path):
    from kbench.study.executors import LOGS, OWNER, _member_task

    (tmp_path / OWNER).write_text("the new driver's token")
    (tmp_path / LOGS).mkdir()

    def run_member(*args, **kwargs):
        raise AssertionError("a stray task trained")

    assert _member_task(run_member, _member("a"), str(tmp_path), "tensorflow", "the old one's", 1) is None
    assert sorted(os.listdir(tmp_path)) == [OWNER, LOGS] and not os.listdir(tmp_path / LOGS)


# -- a simulated cluster ------------------------------------------------------------------------------------

TWINS = """
[study]
name = "twins"
data = "{data}"
test_data = ""

[train]
epochs = 3
batch_size = 8
image_size = 96
lr = 2e-3
weights = "none"
val_split = 0.2

[[backbones]]
name = "a"
backbone = "small_cnn"

[[backbones]]
name = "b"
backbone = "small_cnn"

[[backbones]]
name = "quick"
backbone = "small_cnn"
epochs = 1
image_size = 32

[latency]
runtimes = ["onnxruntime-cpu"]
batch_sizes = [1]
runs = 3
warmup = 1
"""


LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (1 CPU) and two worker nodes (1 CPU each) on loopback, in a Ray temp folder of their
    own (RAY_TMPDIR: other Rays on this machine neither see it nor are seen)."""
    from ray.cluster_utils import Cluster

    saved = {name: os.environ.get(name) for name in ("RAY_TMPDIR", "PYTHONPATH", LOOPBACK)}
    # short: Ray's sockets live below it (.../session_DATE_PID/sockets/plasma_store), and a UNIX
    # socket's path has at most 107 bytes (pytest's own temp folders under xdist are too long)
    ray_tmp = tempfile.mkdtemp(prefix="kbr-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    # Ray's single-machine mode (its macOS default): 127.0.0.1 stays 127.0.0.1, where Ray otherwise
    # swaps it for this machine's network address (and the driver looks for the GCS there)
    os.environ[LOOPBACK] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, saved["PYTHONPATH"]) if p)  # workers' kbench
    node = dict(num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False)
    simulated = Cluster(initialize_head=True, head_node_args=node)
    workers = [simulated.add_node(**node) for _ in range(2)]
    simulated.wait_for_nodes()
    yield SimpleNamespace(cluster=simulated, workers=workers, address=simulated.address, node=node)
    simulated.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """A study of two identical members (same settings and seed), on 600 images upsized to 96 px:
    epochs of seconds, long enough to lose a node in one."""
    from kbench.data.synthetic import write_kaggle_dataset

    root = tmp_path_factory.mktemp("twins")
    data = write_kaggle_dataset(str(root / "data"), n_train=600, n_test=10, image_size=32, seed=2)
    path = root / "twins.toml"
    path.write_text(TWINS.format(data=data["train"]))
    return str(path)


def _history(out, name):
    with open(os.path.join(out, "runs", name, "history.csv")) as handle:
        return [{k: v for k, v in row.items() if "seconds" not in k and k != "lr"} for row in csv.DictReader(handle)]


def _node_of(out, name):
    """The Ray node id an entry's task printed first in its log (its last start)."""
    lines = open(os.path.join(out, "logs", f"{name}.log")).read().splitlines()
    return [line.split("Ray node ")[1][:12] for line in lines if "Ray node " in line][-1]


def _pid(out, name):
    """The process id of an entry's first task (its log's first line)."""
    return int(open(os.path.join(out, "logs", f"{name}.log")).readline().split("(pid ")[1].split(",")[0])


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")  # a zombie is gone


def _wait_for(predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _epochs_done(out, name):
    try:
        return len(json.load(open(os.path.join(out, "runs", name, "checkpoint.json")))["history"])
    except (OSError, ValueError, KeyError):
        return -1


def _start(config, out, *more):
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "cli.py"), "bench", "--config", config, "--out", str(out), *more],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.heavy
def test_a_study_spread_over_three_nodes_gives_the_sequential_results(cluster, tmp_path):
    from test_study import CONFIG

    from kbench.data.synthetic import write_kaggle_dataset
    from kbench.study.config import load_config
    from kbench.study.study import run_study

    data = write_kaggle_dataset(str(tmp_path / "data"), n_train=240, n_test=30, image_size=32, seed=1)
    path = tmp_path / "tiny.toml"
    path.write_text(CONFIG.format(data=data["train"], test=data["test"], answers=data["answers"], missing="/no.keras"))
    sequential = run_study(load_config(str(path)), str(tmp_path / "seq"), echo=lambda line: None)
    out = tmp_path / "three"
    done = run_process("bench", "--config", str(path), "--out", str(out), "--executor", "ray",
                       "--address", cluster.address, timeout=400)  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]  # "broken" fails, as in the sequential run
    assert "on 3 node(s), 3 CPUs, 0 GPUs (an entry asks for 1 CPU)" in done.stderr
    on_ray = json.load(open(out / "results.json"))
    assert [(r["name"], r["status"][:40]) for r in on_ray["rows"]] == [
        (r["name"], r["status"][:40]) for r in sequential["rows"]
    ]
    for ray_row, row in zip(on_ray["rows"], sequential["rows"]):
        if row["status"] == "ok":
            assert ray_row["val_log_loss"] == pytest.approx(row["val_log_loss"], rel=1e-2), row["name"]
    assert on_ray["submission"]["model"] == sequential["submission"]["model"]
    nodes = {_node_of(str(out), name) for name in ("small_cnn", "small_cnn_24", "broken")}
    assert len(nodes) >= 2, nodes  # spread: one CPU per node, three entries at once
    assert not [name for name in os.listdir(out) if name.startswith(".kbench-probe")]

    # Another Ray on this machine (the simulated cluster wrote its address where a plain ray.init()
    # looks): without --address kbench starts its own beside it and says so in one line.
    alone = run_process(
        "bench", "--config", str(path), "--out", str(tmp_path / "own"), "--executor", "ray", timeout=400
    )
    assert alone.returncode == 1, alone.stderr[-3000:]
    assert f"another Ray runs on this machine ({cluster.address}); kbench starts its own" in alone.stderr
    assert "on 1 node(s)" in alone.stderr


@pytest.mark.heavy
def test_a_killed_driver_loses_nothing_finished_and_its_tasks_write_no_more(cluster, twins, tmp_path):
    out = tmp_path / "killed"
    driver = _start(twins, out, "--executor", "ray", "--address", cluster.address)
    try:
        finished = lambda: os.path.isfile(out / "runs" / "quick" / "model.keras")  # noqa: E731
        assert _wait_for(lambda: finished() and max(_epochs_done(out, "a"), _epochs_done(out, "b")) >= 1, 300)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        driver.kill()
    quick = os.path.getmtime(out / "runs" / "quick" / "model.keras")
    workers = [_pid(str(out), name) for name in ("a", "b")]
    assert _wait_for(lambda: not any(map(_alive, workers)), 60), "the dead driver's tasks still run"
    interrupted = {name: _epochs_done(out, name) for name in ("a", "b")}
    again = run_process("bench", "--config", twins, "--out", str(out), "--executor", "ray",
                        "--address", cluster.address, timeout=400)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    results = json.load(open(out / "results.json"))
    assert {row["name"]: row["status"] for row in results["rows"]} == {"a": "ok", "b": "ok", "quick": "ok"}
    assert os.path.getmtime(out / "runs" / "quick" / "model.keras") == quick  # reused, not trained again
    assert _history(str(out), "a") == _history(str(out), "b")  # resumed or not, as if never stopped
    for name in ("a", "b"):
        assert len(_history(str(out), name)) == 3  # no epoch trained twice into the history
    for name, epochs in interrupted.items():
        if epochs >= 1:  # the next driver went on from where the dead one's task stopped
            assert f"resuming from its checkpoint after epoch {epochs}" in open(out / "logs" / f"{name}.log").read()
    modified = {name: os.path.getmtime(out / "runs" / name / "model.keras") for name in ("a", "b")}
    time.sleep(3)
    assert modified == {name: os.path.getmtime(out / "runs" / name / "model.keras") for name in ("a", "b")}


@pytest.mark.heavy
def test_a_node_lost_mid_member_resumes_it_elsewhere_from_its_checkpoint(cluster, twins, tmp_path):
    out = tmp_path / "lost"
    driver = _start(twins, out, "--executor", "ray", "--address", cluster.address)
    try:
        assert _wait_for(lambda: _epochs_done(out, "a") == 1 and _epochs_done(out, "b") == 1, 300), "no epoch 2"
        ids = {worker.node_id[:12]: worker for worker in cluster.workers}
        victim = next(name for name in ("a", "b") if _node_of(str(out), name) in ids)  # not the head's
        cluster.cluster.remove_node(ids[_node_of(str(out), victim)], allow_graceful=False)  # in its 2nd epoch
        cluster.workers.remove(ids[_node_of(str(out), victim)])
        cluster.workers.append(cluster.cluster.add_node(**cluster.node))  # the spot instance comes back
        stdout, stderr = driver.communicate(timeout=400)
    finally:
        driver.kill()
    assert driver.returncode == 0, stderr[-3000:]
    assert f"{victim}: its Ray node was lost; starting it again, from its last checkpoint (start 2)" in stderr
    results = json.load(open(out / "results.json"))
    assert {row["name"]: row["status"] for row in results["rows"]} == {"a": "ok", "b": "ok", "quick": "ok"}
    row = next(row for row in results["rows"] if row["name"] == victim)
    assert row["ray_starts"] == 2
    other = "b" if victim == "a" else "a"
    assert len(_history(str(out), victim)) == 3
    assert _history(str(out), victim) == _history(str(out), other)  # equal to the uninterrupted twin
    assert "resuming from its checkpoint after epoch 1" in open(out / "logs" / f"{victim}.log").read()  # redid 1
