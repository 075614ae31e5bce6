"""Several processes training one model (kbench.training.distributed, `kbench launch`): the environment, the
launcher's promises (stops the rest, passes Ctrl-C on, refuses what can't work), the shards, and two
JAX processes following one process's loss curve."""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from kbench.core.errors import KbenchError
from kbench.data.dataset import ImageSet
from kbench.data.loader import ImageLoader
from kbench.training.distributed import ADDRESS, CLUSTER_VARIABLES, COUNT, INDEX, Cluster, cluster_from_environment
from kbench.training.runs import Run

from conftest import BACKEND, REPO, run_cli


def test_the_cluster_environment_is_read_and_checked():
    assert cluster_from_environment({}) is None
    assert cluster_from_environment({ADDRESS: "h:1", COUNT: "1", INDEX: "0"}) is None  # one process
    assert cluster_from_environment({ADDRESS: "h:1", COUNT: "4", INDEX: "3"}) == Cluster("h:1", 4, 3)
    step = {"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}
    assert cluster_from_environment(step) == Cluster(None, 2, 1)  # inside `srun --ntasks 2`
    # an sbatch --ntasks=2 job's batch script, or a process it starts otherwise, is one process
    assert cluster_from_environment({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}) is None
    assert cluster_from_environment({**step, "SLURM_STEP_NUM_TASKS": "1"}) is None
    for environ, message in (
        ({ADDRESS: "h:1"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID not set"),
        ({ADDRESS: "h:1", COUNT: "2", INDEX: "2"}, "must be in 0..1"),
        ({ADDRESS: "h", COUNT: "2", INDEX: "0"}, "must be host:port"),
        ({ADDRESS: "h:1", COUNT: "two", INDEX: "0"}, "must be a whole number"),
    ):
        with pytest.raises(KbenchError, match=message):
            cluster_from_environment(environ)


@pytest.mark.parametrize("count", [2, 4])
def test_the_shards_of_every_batch_make_up_the_global_batch(count):
    images = ImageSet("d", [f"{i}.jpg" for i in range(37)], np.zeros(37, int), ["a", "b"], "folders")
    loaders = [
        ImageLoader(images, np.arange(37), 8, 8, shuffle=True, seed=3, shard=(rank, count), multiple=count)
        for rank in range(count)
    ]
    whole = ImageLoader(images, np.arange(37), 8, 8, shuffle=True, seed=3)
    for epoch in (0, 1):
        for batch in range(len(whole)):
            shards = [loader.members(epoch, batch) for loader in loaders]
            assert len({len(shard) for shard in shards}) == 1  # every process feeds as many images
            union = np.concatenate(shards)
            expected = whole.order(epoch)[batch * 8 : (batch + 1) * 8]
            if len(expected) >= count:  # the last batch (5 images) is cut to a multiple of the processes
                assert union.tolist() == expected[: len(expected) - len(expected) % count].tolist()
            else:
                assert set(union) == set(expected)


def test_a_run_opened_by_another_process_than_0_writes_nothing(tmp_path):
    run = Run(str(tmp_path / "run"), writer=False)
    with run.lock():
        assert run.prepare("backbone") is None
        run.write_config({"kind": "backbone"})
        run.write_history([{"epoch": 1}])
        run.write_metrics({})
        run.clear_checkpoint()
    assert not os.path.exists(run.path)


def launcher(*args, **options):
    return subprocess.Popen(
        [sys.executable, "-m", "kbench", "launch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        **options,
    )


def test_launch_stops_the_others_when_one_fails_and_exits_with_its_status(tmp_path):
    script = (
        "import os, sys, time; rank = int(os.environ['JAX_PROCESS_ID']);"
        "print('env', os.environ['JAX_COORDINATOR_ADDRESS'], os.environ['JAX_NUM_PROCESSES'], rank, flush=True);"
        "time.sleep(0.5) if rank == 1 else time.sleep(120); sys.exit(3)"
    )
    started = time.monotonic()
    done = launcher("--processes", "3", "--", sys.executable, "-c", script)
    out, err = done.communicate(timeout=60)
    assert done.returncode == 3, (out, err)
    assert time.monotonic() - started < 30  # ranks 0 and 2 were stopped, not waited for
    lines = sorted(line for line in out.splitlines() if " env " in line)
    assert [line.split()[:2] for line in lines] == [["[rank", "0]"], ["[rank", "1]"], ["[rank", "2]"]]
    assert all(re.search(r"env 127\.0\.0\.1:\d+ 3 \d$", line) for line in lines)


def test_ctrl_c_reaches_every_process_once(tmp_path):
    script = (
        "import os, signal, sys, time; rank = os.environ['JAX_PROCESS_ID'];"
        f"path = os.path.join({str(tmp_path)!r}, rank);"
        "signal.signal(signal.SIGINT, lambda *a: (open(path, 'a').write('int\\n'), sys.exit(130)));"
        "print('ready', flush=True); time.sleep(120)"
    )
    done = launcher("--processes", "2", "--", sys.executable, "-c", script)
    deadline = time.monotonic() + 30
    ready = 0
    while ready < 2 and time.monotonic() < deadline:
        ready += "ready" in done.stdout.readline()
    done.send_signal(signal.SIGINT)
    done.communicate(timeout=30)
    assert done.returncode == 130
    assert [open(tmp_path / rank).read() for rank in ("0", "1")] == ["int\n", "int\n"]


def test_a_signal_landing_during_the_stop_gather_counts_at_the_next_gather_on_every_process(monkeypatch):
    """Ranks decide a stop from the gathered value only: a SIGINT that lands on this process while the
    all-gather runs (the others gathered 0) must not make it stop alone, which left the others' next
    collective facing a different one ("passed to device_put is not the same on each process")."""
    from kbench.training import distributed
    from kbench.training.epochs import StopRequest

    stop = StopRequest()
    calls = []

    def gather(value):  # what every process contributed: nothing yet; the signal lands meanwhile
        calls.append(value)
        if len(calls) == 1:
            stop._handle(signal.SIGINT, None)
            return 0
        return value

    monkeypatch.setattr(distributed, "largest_everywhere", gather)
    assert stop.agreed() is None  # as on the processes that gathered 0
    assert stop.agreed() == signal.SIGINT and calls == [0, signal.SIGINT]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_ranks_die_with_a_killed_launcher_which_forks_without_preexec_fn(tmp_path, monkeypatch):
    import kbench.training.launch as launching

    started, popen = [], subprocess.Popen
    monkeypatch.setattr(launching.subprocess, "Popen", lambda *a, **k: started.append(k) or popen(*a, **k))
    assert launching.launch(launching.LaunchConfig(processes=2), [sys.executable, "-c", "pass"], echo=lambda _: 0) == 0
    assert len(started) == 2 and not any("preexec_fn" in options for options in started)

    script = (
        f"import os, time; path = os.path.join({str(tmp_path)!r}, os.environ['JAX_PROCESS_ID']);"
        "open(path, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    done = launcher("--processes", "2", "--", sys.executable, "-c", script)
    deadline = time.monotonic() + 60
    while not all((tmp_path / rank).exists() and (tmp_path / rank).read_text() for rank in "01"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ranks = [int((tmp_path / rank).read_text()) for rank in "01"]
    done.kill()
    done.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read() for pid in ranks):
        assert time.monotonic() < deadline, "a rank outlived its launcher"
        time.sleep(0.1)


def test_launch_refuses_what_cannot_work(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    log_file = run_cli("launch", "--log-dir", str(tmp_path / "notes.txt"), "--", "true")
    assert (
        log_file.returncode == 2
        and log_file.stderr == f"kbench: error: --log-dir {tmp_path}/notes.txt is a file, not a folder\n"
    )
    missing = run_cli("launch", "--", "no-such-command-kbench")
    assert missing.returncode == 2 and "command not found: no-such-command-kbench" in missing.stderr
    empty = run_cli("launch", "--processes", "2")
    assert empty.returncode == 2 and "give the command to launch" in empty.stderr
    zero = run_cli("launch", "--processes", "0", "--", "true")
    assert zero.returncode == 2 and "--processes must be a whole number >= 1" in zero.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = run_cli("launch", "--port", str(busy.getsockname()[1]), "--", "true")
    assert taken.returncode == 2 and "can't be used" in taken.stderr


def test_multi_process_training_under_tensorflow_is_refused_in_one_line(kaggle_data, tmp_path):
    environment = {ADDRESS: "127.0.0.1:1", COUNT: "2", INDEX: "0"}
    done = run_cli(
        *("train", "--backbone", "small_cnn", "--data", kaggle_data["train"], "--run-dir", str(tmp_path / "r")),
        *("--backend", "tensorflow", "--devices", "all"),
        env=environment,
    )
    assert done.returncode == 2 and "multi-process training runs under JAX only" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "r")


def test_the_documented_examples_set_the_variables_kbench_reads():
    text = open(os.path.join(REPO, "docs", "backends-and-devices.md"), encoding="utf-8").read()
    section = text[text.index("## Several devices") :]
    section = section[: section.index("\n## ", 10)]
    slurm = section[section.index("# SLURM") : section.index("# Kubernetes")]
    kubernetes = section[section.index("# Kubernetes") : section.index("```", section.index("# Kubernetes"))]
    for example in (slurm, kubernetes):
        assert set(re.findall(r"\b(JAX_[A-Z_]+)=", example)) == set(CLUSTER_VARIABLES), example
    values = dict(re.findall(r"(JAX_[A-Z_]+)=(\S+)", kubernetes))
    values[INDEX] = values[INDEX].replace("$(JOB_COMPLETION_INDEX)", "1")  # what the pod's index gives
    assert cluster_from_environment(values) == Cluster("kbench-0.kbench:1234", 2, 1)
    slurm_values = dict(re.findall(r"(JAX_[A-Z_]+)=(\S+)", slurm))
    assert slurm_values[COUNT] == "$SLURM_NTASKS" and slurm_values[INDEX] == "$SLURM_PROCID"


def losses(run_dir):
    return [float(row["loss"]) for row in csv.DictReader(open(os.path.join(run_dir, "history.csv")))]


@pytest.mark.skipif(BACKEND != "jax", reason="multi-process training runs under JAX")
def test_two_processes_follow_the_one_process_loss_curve(kaggle_data, tmp_path):
    arguments = (
        *("train", "--backbone", "small_cnn", "--data", kaggle_data["train"], "--image-size", "24"),
        *("--epochs", "2", "--batch-size", "16", "--lr", "2e-3", "--quiet", "--backend", "jax", "--devices", "all"),
    )
    cpu = {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "-1"}
    one = run_cli(*arguments, "--run-dir", str(tmp_path / "one"), env=cpu, timeout=120)
    assert one.returncode == 0, one.stderr
    two = run_cli("launch", "--processes", "2", "--", "kbench", *arguments, "--run-dir", str(tmp_path / "two"),
                  env=cpu, timeout=120)  # fmt: skip
    assert two.returncode == 0, two.stdout[-2000:]
    assert "[rank 1] process 1 of 2: done" in two.stdout and "[rank 0] small_cnn (jax): val log loss" in two.stdout
    metrics = json.load(open(tmp_path / "two" / "metrics.json"))
    assert metrics["processes"] == 2 and len(metrics["devices"]) == 2 and metrics["global_batch_size"] == 16
    # measured: 2.8e-3 relative by epoch 3 for two processes, as for two virtual devices (test_devices.py);
    # 2.4e-5 for four processes
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=5e-3)
    kept = sorted(os.listdir(tmp_path / "two"))
    assert kept == sorted(os.listdir(tmp_path / "one")) and ".kbench.lock" not in kept


@pytest.mark.skipif(BACKEND != "jax", reason="multi-process training runs under JAX")
def test_two_processes_without_validation_split_finish(kaggle_data, tmp_path):
    arguments = (
        *("train", "--backbone", "small_cnn", "--data", kaggle_data["train"], "--image-size", "24", "--val-split", "0"),
        *("--batch-size", "16", "--quiet", "--backend", "jax", "--devices", "all", "--run-dir", str(tmp_path / "r")),
    )
    cpu = {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "-1"}
    done = run_cli("launch", "--processes", "2", "--", "kbench", *arguments, "--epochs", "1", env=cpu, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "no validation split" in done.stdout
    metrics = json.load(open(tmp_path / "r" / "metrics.json"))
    assert metrics["epochs_trained"] == 1 and metrics["processes"] == 2 and metrics["val_log_loss"] is None


@pytest.fixture
def two_gpus(tmp_path, monkeypatch):
    """A stand-in nvidia-smi on PATH that lists two GPUs (asked afresh, and forgotten afterwards)."""
    from kbench.core import machine

    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    line = "echo 'NVIDIA H100 80GB HBM3, 81559, 570.124.06'"
    fake.write_text(f"#!/bin/sh\n{line}\n{line}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    machine._nvidia_smi.cache_clear()
    yield
    machine._nvidia_smi.cache_clear()


def test_launch_gives_each_rank_its_own_gpu_and_refuses_more_ranks_than_gpus(two_gpus):
    script = "import os; print('gpu', os.environ['JAX_PROCESS_ID'], os.environ['CUDA_VISIBLE_DEVICES'])"
    done = run_cli("launch", "--processes", "2", "--", sys.executable, "-c", script)
    assert done.returncode == 0, done.stderr
    assert sorted(line.split("] ", 1)[1] for line in done.stdout.splitlines() if "] gpu" in line) == [
        "gpu 0 0",
        "gpu 1 1",
    ]
    refused = run_cli("launch", "--processes", "3", "--", sys.executable, "-c", script)
    assert refused.returncode == 2 and "gpu" not in refused.stdout
    assert refused.stderr.strip().splitlines() == [
        "kbench: error: --processes 3 needs a GPU per process and this machine has 2 (GPU 0,1): give "
        "--processes 2 or fewer, or CUDA_VISIBLE_DEVICES= to run on the CPU"
    ]


def test_slurm_with_one_task_per_node_gives_jax_every_gpu_of_the_node(two_gpus):
    from kbench.training.distributed import slurm_local_devices
    from kbench.training.launch import rank_devices

    one_per_node = {"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2"}
    assert slurm_local_devices(one_per_node) == [0, 1]  # JAX alone would give [SLURM_LOCALID] = [0]
    assert slurm_local_devices({**one_per_node, "SLURM_STEP_NUM_TASKS": "4"}) is None  # one GPU per task
    assert slurm_local_devices({**one_per_node, "SLURM_STEP_NUM_TASKS": "4", "CUDA_VISIBLE_DEVICES": "1"}) == [0]
    assert slurm_local_devices({"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2"}) is None  # no SLURM
    assert rank_devices(2, {"CUDA_VISIBLE_DEVICES": ""}) == [{}, {}]  # GPUs hidden: the CPU, any count


@pytest.mark.heavy  # about 50 s: two JAX processes train, stop, resume, and are refused (make test-heavy)
@pytest.mark.skipif(BACKEND != "jax", reason="multi-process training runs under JAX")
def test_ctrl_c_stops_every_rank_with_its_line_then_resume_and_a_finished_folder_is_refused_by_all(
    kaggle_data, tmp_path
):
    """Ctrl-C to `kbench launch`: every rank stops after the same batch with its interrupt line (no
    rank left in a collective, no JAX abort), the checkpoint resumes; launching into the finished
    folder ends every rank at once with process 0's refusal and exit 2."""
    run_dir = str(tmp_path / "run")
    train = (
        *("kbench", "train", "--backbone", "small_cnn", "--data", kaggle_data["train"], "--image-size", "24"),
        *(
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--quiet",
            "--backend",
            "jax",
            "--devices",
            "all",
            "--run-dir",
            run_dir,
        ),
    )
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "-1"}
    launch = [sys.executable, os.path.join(REPO, "cli.py"), "launch", "--processes", "2", "--"]
    process = subprocess.Popen([*launch, *train], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(run_dir, "checkpoint.json")) and time.monotonic() < deadline:
            time.sleep(0.2)  # epoch 1 has begun (its first batches compile for seconds)
        process.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        output = process.communicate(timeout=60)[0]
    finally:
        process.kill()
    # no hang (it was over 200 s); each rank's own interrupt line below shows none needed the launcher's kill
    assert time.monotonic() - stopped < 30 and process.returncode == 130, output
    for rank in (0, 1):
        assert f"[rank {rank}] kbench: interrupted in epoch 1/2" in output, output
    assert "Check failure" not in output and "Traceback" not in output and "unexpected" not in output, output

    environment_run = {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "-1"}
    resumed = run_cli("launch", "--processes", "2", "--", "kbench", "train", "--run-dir", run_dir, "--resume",
                      "--quiet", env=environment_run, timeout=120)  # fmt: skip
    assert resumed.returncode == 0 and "[rank 0] small_cnn (jax): val log loss" in resumed.stdout, resumed.stdout
    assert len(Run(run_dir).history) == 2

    start = time.monotonic()
    again = run_cli("launch", "--processes", "2", "--", *train, env=environment_run, timeout=120)
    assert again.returncode == 2 and time.monotonic() - start < 60, again.stdout
    assert f"[rank 0] kbench: error: {run_dir} already holds a finished run" in again.stdout
    assert "[rank 1] kbench: error: process 0 refused" in again.stdout
