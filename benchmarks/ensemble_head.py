"""Does caching member features make head epochs nearly free? Stack the same members twice, with 1 and
with 20 head epochs (each from scratch: features computed in both, after a warm-up run that pays the
process's one-time compilation), and compare the wall time.

    python benchmarks/ensemble_head.py [RUN1,RUN2,...] [--backend jax] [--head-epochs 1,20]
        [--json benchmarks/results/ensemble-head/ensemble_head.json]

Members: finished run folders on the same data and split. Without them, the script trains the demo
study's stacked ensemble's members (small_cnn at 64 and 40 px, kbench/studies/demo.toml) on the
demo's generated images (``--images``, 600 as in ``kbench demo``) in a temporary folder first, and
takes the head epochs from that ensemble. Prints a markdown table and writes its rows as JSON. Tiny
mode, for tests: --images 40 --member-epochs 1 --head-epochs 1,2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import record  # noqa: E402
from kbench.core.backend import use_backend  # noqa: E402

COLUMNS = ["head_epochs", "wall_seconds", "feature_seconds", "head_seconds", "val_log_loss", "val_accuracy"]


def demo_members(folder: str, images: int, member_epochs: int | None, backend: str) -> tuple[list[dict], int]:
    """Train the demo's stacked ensemble's members on the demo's generated images; returns their
    records ({name, run_dir, val_log_loss, ...}) and the ensemble's head epochs."""
    from kbench.data.synthetic import write_kaggle_dataset
    from kbench.study.config import load_config
    from kbench.training.train import train

    data = write_kaggle_dataset(os.path.join(folder, "data"), n_train=images, n_test=1, image_size=64)
    study = load_config("demo", data=data["train"], test_data="", answers="", backend=backend)
    stacked = next(entry for entry in study.ensembles if entry.config.method == "stack")
    by_name = {member.name: member for member in study.backbones}
    members = []
    for name in stacked.members:
        config = dataclasses.replace(
            by_name[name].train,
            run_dir=os.path.join(folder, "runs", name),
            epochs=member_epochs or by_name[name].train.epochs,
        )
        result = train(config, verbose=0)
        members.append(
            {
                "name": name,
                "run_dir": config.run_dir,
                "epochs": config.epochs,
                "image_size": result["image_size"],
                "val_log_loss": result["val_log_loss"],
                "val_accuracy": result["val_accuracy"],
            }
        )
    return members, stacked.config.epochs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("members", nargs="?", help="comma-separated run folders (default: train the demo's)")
    parser.add_argument("--backend", default=None)
    parser.add_argument(
        "--images", type=record.positive_int, default=600, help="generated training images, without MEMBERS"
    )
    parser.add_argument("--member-epochs", type=record.positive_int, default=None, help="default: the demo study's")
    parser.add_argument(
        "--head-epochs",
        default=None,
        help="comma-separated, first and last compared (default: 1 and the demo ensemble's 20)",
    )
    record.add_json_option(parser, "ensemble_head")
    args = parser.parse_args(argv)
    began = record.Record(__file__, argv)
    backend = use_backend(args.backend)

    from kbench.core.files import read_json
    from kbench.core.tables import format_table
    from kbench.training.ensemble import EnsembleConfig, train_ensemble
    from kbench.training.runs import METRICS

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        if args.members:
            members = [
                {"name": os.path.basename(path.rstrip("/")), "run_dir": path, **read_json(os.path.join(path, METRICS))}
                for path in args.members.split(",")
            ]
            demo_epochs = 20
        else:
            members, demo_epochs = demo_members(folder, args.images, args.member_epochs, backend)
        epochs = [int(e) for e in args.head_epochs.split(",")] if args.head_epochs else [1, demo_epochs]
        paths = [member["run_dir"] for member in members]
        # the first run pays the process's one-time compilation: run it, then measure
        for label, head_epochs in [("warm-up", epochs[0])] + [(str(e), e) for e in epochs]:
            start = time.perf_counter()
            config = EnsembleConfig(paths, os.path.join(folder, "ensembles", label), epochs=head_epochs)
            result = train_ensemble(config, verbose=0)
            if label != "warm-up":
                rows.append(
                    {
                        "head_epochs": head_epochs,
                        "wall_seconds": time.perf_counter() - start,
                        **{key: result[key] for key in COLUMNS[2:]},
                    }
                )
    ratio = rows[-1]["wall_seconds"] / rows[0]["wall_seconds"]
    member_summary = [
        {key: member.get(key) for key in ("name", "image_size", "epochs", "val_log_loss", "val_accuracy")}
        for member in members
    ]
    table = format_table(rows, COLUMNS, style="markdown")
    lines = [f"{rows[-1]['head_epochs']} head epochs / {rows[0]['head_epochs']} head epoch(s), wall time: {ratio:.2f}x"]
    lines += [
        f"member {m['name']} ({m['image_size']} px): val log loss {m['val_log_loss']:.4f}" for m in member_summary
    ]
    print(f"backend {backend}\n\n{table}\n\n" + "\n".join(lines))
    return began.write(args.json, rows, table, backend=backend, wall_ratio=ratio, members=member_summary)


if __name__ == "__main__":
    main()
