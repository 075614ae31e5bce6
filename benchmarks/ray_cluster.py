"""The study on a simulated 3-node Ray cluster (``ray.cluster_utils.Cluster``: a head and two worker
nodes of one CPU each, on 127.0.0.1) against the sequential run, and a node lost in an entry's second
epoch: wall times, identical results, epochs redone. Each `kbench bench` is a fresh process on a fresh
folder. Page: benchmarks/docs/ray.md.

    PYTHONPATH=. python benchmarks/ray_cluster.py
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record  # noqa: E402

REPO = record.REPO
sys.path.insert(0, os.path.join(REPO, "tests"))
from test_executors import TWINS  # noqa: E402
from test_study import CONFIG  # noqa: E402


def bench(config: str, out: str, *more: str, lose: tuple = (), cluster=None) -> tuple[float, str, str | None]:
    """Wall seconds of `kbench bench`, its stderr and the entry whose node was lost: with ``lose``,
    once the entries named there record one finished epoch (they are in their second), the worker node
    running the first of them not on the head is removed."""
    started = time.perf_counter()
    command = [sys.executable, os.path.join(REPO, "cli.py"), "bench", "--config", config, "--out", out, *more]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = None
    if lose:
        while not all(_epochs(out, name) == 1 for name in lose):
            time.sleep(0.1)
        workers = {w.node_id[:12]: w for w in cluster.worker_nodes}
        nodes = {name: open(os.path.join(out, "logs", f"{name}.log")).readline().split("Ray node ")[1][:12]
                 for name in lose}  # fmt: skip
        victim = next(name for name in lose if nodes[name] in workers)
        cluster.remove_node(workers[nodes[victim]], allow_graceful=False)
    _, stderr = process.communicate()
    return time.perf_counter() - started, stderr, victim


def _epochs(out: str, name: str) -> int:
    try:
        return len(json.load(open(os.path.join(out, "runs", name, "checkpoint.json")))["history"])
    except (OSError, ValueError, KeyError):
        return -1


def rows_of(out: str) -> list[tuple]:
    results = json.load(open(os.path.join(out, "results.json")))
    return [(r["name"], r["status"][:30], r.get("val_log_loss")) for r in results["rows"]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    record.add_json_option(parser, "ray_cluster")
    args = parser.parse_args(argv)
    began = record.Record(__file__, argv)
    root = tempfile.mkdtemp(prefix="kbr-")
    os.environ.update(RAY_TMPDIR=os.path.join(root, "r"), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    from ray.cluster_utils import Cluster

    from kbench.data.synthetic import write_kaggle_dataset

    data = write_kaggle_dataset(os.path.join(root, "tiny"), n_train=240, n_test=30, image_size=32, seed=1)
    tiny = os.path.join(root, "tiny.toml")
    with open(tiny, "w") as handle:
        handle.write(CONFIG.format(data=data["train"], test=data["test"], answers=data["answers"], missing="/no"))
    twins_data = write_kaggle_dataset(os.path.join(root, "twins"), n_train=600, n_test=10, image_size=32, seed=2)
    twins = os.path.join(root, "twins.toml")
    with open(twins, "w") as handle:
        handle.write(TWINS.format(data=twins_data["train"]))

    rows = []
    seconds, _, _ = bench(tiny, os.path.join(root, "seq"))
    rows.append({"case": "tiny study, sequential", "seconds": round(seconds, 1), "same_results": True})
    node = dict(num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False)
    cluster_started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args=node)
    for _ in range(2):
        cluster.add_node(**node)
    cluster.wait_for_nodes()
    start_seconds = time.perf_counter() - cluster_started
    try:
        ray = ("--executor", "ray", "--address", cluster.address)
        seconds, _, _ = bench(tiny, os.path.join(root, "three"), *ray)
        same = rows_of(os.path.join(root, "three")) == rows_of(os.path.join(root, "seq"))
        rows.append({"case": "tiny study, 3 nodes", "seconds": round(seconds, 1), "same_results": same})
        seconds, _, _ = bench(twins, os.path.join(root, "whole"), *ray)
        rows.append({"case": "twins, 3 nodes", "seconds": round(seconds, 1), "same_results": True})
        seconds, stderr, victim = bench(twins, os.path.join(root, "lost"), *ray, lose=("a", "b"), cluster=cluster)
        histories = []
        for out in ("whole", "lost"):
            with open(os.path.join(root, out, "runs", victim, "history.csv")) as handle:
                histories.append([row["val_loss"] for row in csv.DictReader(handle)])
        log = open(os.path.join(root, "lost", "logs", f"{victim}.log")).read()
        redone = [line for line in log.splitlines() if "resuming from its checkpoint" in line]
        rows.append(
            {
                "case": f"twins, 3 nodes, {victim}'s node lost in its epoch 2",
                "seconds": round(seconds, 1),
                "same_results": histories[0] == histories[1],
                "restarted": "its Ray node was lost" in stderr,
                "resumed": redone[0].split("kbench: INFO: ")[-1] if redone else None,
            }
        )
    finally:
        cluster.shutdown()
    table = "\n".join(
        ["| case | wall s | same results |", "|---|---|---|"]
        + [f"| {r['case']} | {r['seconds']} | {r['same_results']} |" for r in rows]
    )
    print(table)
    print(f"cluster start: {start_seconds:.1f} s; {rows[-1].get('resumed')}")
    began.write(args.json, rows, table, cluster_start_seconds=round(start_seconds, 1))


if __name__ == "__main__":
    main()
