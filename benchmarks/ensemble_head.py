"""Does caching member features make head epochs nearly free? Stack the same members twice, with 1 and
with 20 head epochs (each from scratch: features computed in both, after a warm-up run that pays the
process's one-time compilation), and compare the wall time.

    python benchmarks/ensemble_head.py RUN1,RUN2[,...] [--backend jax]

Members: finished run folders on the same data and split (e.g. reports/demo/runs/* after make demo).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kbench.backend import use_backend  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("members")
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    use_backend(args.backend)
    from kbench.ensemble import EnsembleConfig, train_ensemble

    members = args.members.split(",")
    print("| head epochs | wall s | feature s | head s | val log loss | val accuracy |\n|---|---|---|---|---|---|")
    walls = {}
    with tempfile.TemporaryDirectory() as folder:
        # the first run pays the process's one-time compilation: run it, then measure
        for label, epochs in (("warm-up", 1), ("1", 1), ("20", 20)):
            start = time.perf_counter()
            result = train_ensemble(EnsembleConfig(members, os.path.join(folder, label), epochs=epochs), verbose=0)
            if label == "warm-up":
                continue
            walls[epochs] = time.perf_counter() - start
            print(
                f"| {epochs} | {walls[epochs]:.1f} | {result['feature_seconds']:.1f} | {result['head_seconds']:.2f} "
                f"| {result['val_log_loss']:.4f} | {result['val_accuracy']:.3f} |",
                flush=True,
            )
    print(f"\n20 head epochs / 1 head epoch, wall time: {walls[20] / walls[1]:.2f}x")
    for member in members:
        from kbench.files import read_json

        record = read_json(os.path.join(member, "metrics.json"))
        print(f"member {os.path.basename(member.rstrip('/'))}: val log loss {record['val_log_loss']:.4f}")


if __name__ == "__main__":
    main()
