"""OpenVINO beside ONNX Runtime on kbench's ONNX files, and what int8 pays (issue 28). Not named
openvino.py: run as a script, its folder comes first on sys.path and it would shadow the package.

    python benchmarks/openvino_bench.py [--backbones efficientnet_b0,mobilenet_v2,resnet50] [--batch-sizes 1,32]
        [--rounds 4] [--runs 5] [--budget-s 20] [--int8-backbones ...] [--calibration-images 16]
        [--small-cnn-epochs 3] [--export-dir /tmp/kbench-openvino] [--json benchmarks/results/openvino/openvino.json]

Part 1, latency: each backbone as ``benchmarks/export_graph.py`` builds it (the binary classifier kbench
exports, seeded random weights settled by ``kbench.models.settle``, ImageNet normalisation constants) at its
native size, exported once by ``kbench.export.onnx.export_onnx`` into ``--export-dir`` (a file already there is
reused), then onnxruntime-cpu (one thread per physical core, spinning off: fixed, no probe),
openvino-cpu and openvino-cpu-bf16 (``kbench.serving.openvino``'s fixed settings) timed interleaved
(``kbench.core.timing.interleaved``) at each batch size: p50 of individually timed runs. Each OpenVINO row
carries its parity with Keras on the timed pixels (``kbench.core.metrics.relative_difference``).

Part 2, int8: every configuration of ``kbench.serving.quantize.CANDIDATES`` timed against the float file at batch
1 (``kbench.serving.quantize.quantize_int8``, calibrated on ``--calibration-images`` generated photographs): the
time change only, as random weights have no log loss worth the name. Then the same on a small_cnn
trained for ``--small-cnn-epochs`` on generated cats and dogs (64 px): time and validation log-loss
change, and whether kbench keeps the int8 file.

Tiny mode, for tests: --backbones small_cnn --batch-sizes 1 --rounds 2 --runs 2
--int8-backbones none --calibration-images 4 --small-cnn-epochs 1.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import record  # noqa: E402
from kbench.core.backend import use_backend  # noqa: E402

RUNTIMES = ("onnxruntime-cpu", "openvino-cpu", "openvino-cpu-bf16")


def exported(name: str, export_dir: str) -> tuple[str, str, int]:
    """(ONNX path, .keras path, image size) of backbone ``name``, built and exported once."""
    from benchmarks.export_graph import imagenet_normalization
    from kbench.export.onnx import export_onnx
    from kbench.models.backbones import build_classifier, get_backbone
    from kbench.models.settle import settle_random_weights

    spec = get_backbone(name)
    size = spec.image_size if name != "small_cnn" else 64
    onnx_path, keras_path = (os.path.join(export_dir, f"{name}.{ext}") for ext in ("onnx", "keras"))
    if not (os.path.isfile(onnx_path) and os.path.isfile(keras_path)):
        model = build_classifier(spec, 2, size, "none")
        imagenet_normalization(model)
        settle_random_weights(model)
        model.save(keras_path)
        export_onnx(model, onnx_path)
    return onnx_path, keras_path, size


def runtime_for(name: str):
    from dataclasses import replace

    from kbench.serving.onnx_runtime import FIXED_CPU_SETTINGS, OnnxRuntimeCPU
    from kbench.serving.runtimes import make_runtime

    spinning_off = replace(FIXED_CPU_SETTINGS, spinning=False)
    return OnnxRuntimeCPU(settings=spinning_off) if name == "onnxruntime-cpu" else make_runtime(name)


def latency_rows(name: str, args) -> list[dict]:
    from kbench.core import timing
    from kbench.core.errors import Unavailable
    from kbench.core.metrics import relative_difference
    from kbench.data.synthetic import sample_pixels
    from kbench.export.onnx import load_model

    onnx_path, keras_path, size = exported(name, args.export_dir)
    keras_model = load_model(keras_path)
    rows = []
    for batch in args.batch_sizes:
        pixels = sample_pixels(batch, (size, size))
        expected = np.asarray(keras_model.predict_on_batch(pixels))
        calls, details, parity = {}, {}, {}
        for runtime_name in RUNTIMES:
            runtime = runtime_for(runtime_name)
            try:
                runtime.prepare(onnx_path, (size, size))
            except Unavailable as why:
                rows.append(
                    {"model": name, "runtime": runtime_name, "batch_size": batch, "status": f"unavailable: {why}"}
                )
                continue
            parity[runtime_name] = relative_difference(expected, runtime.run(pixels)[0])
            calls[runtime_name] = lambda r=runtime, x=pixels: r.run(x)
            details[runtime_name] = runtime.detail
        medians = timing.medians(
            timing.interleaved(calls, args.rounds, args.runs, min_rounds=2, budget_s=args.budget_s)
        )
        for runtime_name, p50 in medians.items():
            rows.append(
                {
                    "model": name,
                    "runtime": runtime_name,
                    "batch_size": batch,
                    "p50_ms": p50,
                    "images_per_second": 1000 * batch / p50,
                    "speedup_over_onnxruntime": medians.get("onnxruntime-cpu", float("nan")) / p50,
                    "parity_with_keras": parity[runtime_name],
                    "status": "ok",
                    "detail": details[runtime_name],
                }
            )
        print(name, batch, {k: round(v, 2) for k, v in medians.items()}, flush=True)
    return rows


def int8_row(name: str, onnx_path: str, calibration: str, run_dir: str | None, args) -> dict:
    from kbench.serving.quantize import quantize_int8

    output = os.path.join(args.export_dir, f"{name.split()[0]}.int8.onnx")
    result = quantize_int8(onnx_path, output, calibration, run_dir, calibration_images=args.calibration_images)
    row = {"model": name, "float_ms": result["float_ms"], "kept": result["config"] if result["int8_path"] else "none"}
    row["candidates"] = result["candidates"]
    for key in ("float_val_log_loss", "int8_val_log_loss", "log_loss_bound"):
        if key in result:
            row[key] = result[key]
    print(name, "int8", row["kept"], [(c["config"], round(c["ms"], 2)) for c in row["candidates"]], flush=True)
    return row


def trained_small_cnn(folder: str, epochs: int) -> tuple[str, str]:
    """A small_cnn run on generated cats and dogs and its ONNX file."""
    from kbench.data.synthetic import write_kaggle_dataset
    from kbench.export.onnx import onnx_for
    from kbench.training.config import TrainConfig
    from kbench.training.train import train

    data = write_kaggle_dataset(os.path.join(folder, "data"), n_train=400, n_test=4, image_size=64)
    run_dir = os.path.join(folder, "small_cnn_run")
    config = TrainConfig(backbone="small_cnn", data=data["train"], run_dir=run_dir, epochs=epochs, image_size=64)
    train(config, verbose=0)
    return run_dir, onnx_for(run_dir, os.path.join(folder, "small_cnn_trained.onnx"))["path"]


def precision_log_loss(run_dir: str, onnx_path: str) -> list[dict]:
    """Validation log loss of a trained run's ONNX file on ONNX Runtime and on OpenVINO in f32 and bf16."""
    from kbench.core.metrics import log_loss
    from kbench.data.loader import ImageLoader, predict
    from kbench.training.runs import Run

    images, indices = Run(run_dir).images("val")
    rows = []
    for name in RUNTIMES:
        runtime = runtime_for(name)
        runtime.prepare(onnx_path, (64, 64))
        probabilities, labels = predict(
            lambda x, r=runtime: np.array(r.run(x)[0]), ImageLoader(images, indices, 64, 32)
        )
        rows.append({"runtime": name, "val_log_loss": log_loss(labels, probabilities), "images": len(indices)})
    print("log loss", [(row["runtime"], round(row["val_log_loss"], 5)) for row in rows], flush=True)
    return rows


def markdown(latency: list[dict], int8: list[dict]) -> str:
    lines = ["| model | batch | runtime | p50 ms | img/s | × ORT | parity |", "|---|---|---|---|---|---|---|"]
    for row in latency:
        if row["status"] != "ok":
            lines.append(f"| {row['model']} | {row['batch_size']} | {row['runtime']} | {row['status']} | | | |")
            continue
        lines.append(
            f"| {row['model']} | {row['batch_size']} | {row['runtime']} | {row['p50_ms']:.2f} | "
            f"{row['images_per_second']:.1f} | {row['speedup_over_onnxruntime']:.2f} | {row['parity_with_keras']:.1e} |"
        )
    lines += ["", "| model | configuration | batch-1 ms | × float | val log loss |", "|---|---|---|---|---|"]
    for row in int8:
        loss = f"{row['float_val_log_loss']:.4f}" if "float_val_log_loss" in row else "n/a (random weights)"
        lines.append(f"| {row['model']} | float | {row['float_ms']:.2f} | 1.00 | {loss} |")
        for candidate in row["candidates"]:
            loss = f"{candidate['val_log_loss']:.4f}" if "val_log_loss" in candidate else ""
            mark = " (kept)" if candidate["config"] == row["kept"] else ""
            lines.append(
                f"| {row['model']} | {candidate['config']}{mark} | {candidate['ms']:.2f} | "
                f"{candidate['speedup']:.2f} | {loss} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backbones", type=lambda s: s.split(","), default=["efficientnet_b0", "mobilenet_v2", "resnet50"]
    )
    parser.add_argument("--batch-sizes", type=record.positive_ints, default=[1, 32])
    parser.add_argument("--rounds", type=record.positive_int, default=4)
    parser.add_argument("--runs", type=record.positive_int, default=5)
    parser.add_argument("--budget-s", type=float, default=20.0)
    parser.add_argument(
        "--int8-backbones",
        type=lambda s: [] if s == "none" else s.split(","),
        default=None,
        help="Default: --backbones.",
    )
    parser.add_argument("--calibration-images", type=record.positive_int, default=16)
    parser.add_argument("--small-cnn-epochs", type=record.positive_int, default=3)
    parser.add_argument("--export-dir", default=os.path.join("/tmp", "kbench-openvino"))
    parser.add_argument(
        "--log-loss-only",
        action="store_true",
        help="Only the precisions' log loss, on the trained run in --export-dir.",
    )
    record.add_json_option(parser, "openvino")
    args = parser.parse_args(argv)
    args.rounds += args.rounds % 2
    use_backend("tensorflow")
    started = record.Record(__file__, argv)
    os.makedirs(args.export_dir, exist_ok=True)
    from kbench.data.synthetic import write_class_folders

    if args.log_loss_only:
        run_dir = os.path.join(args.export_dir, "small_cnn_run")
        rows = precision_log_loss(run_dir, os.path.join(args.export_dir, "small_cnn_trained.onnx"))
        table = "| runtime | small_cnn val log loss |\n|---|---|\n" + "\n".join(
            f"| {row['runtime']} | {row['val_log_loss']:.5f} |" for row in rows
        )
        print(table)
        return started.write(args.json, rows, table)
    latency = [row for name in args.backbones for row in latency_rows(name, args)]
    calibration = write_class_folders(os.path.join(args.export_dir, "calibration"), per_class=8, image_size=96)
    int8 = []
    for name in args.backbones if args.int8_backbones is None else args.int8_backbones:
        int8.append(int8_row(name, exported(name, args.export_dir)[0], calibration, None, args))
    run_dir, trained = trained_small_cnn(args.export_dir, args.small_cnn_epochs)
    int8.append(int8_row("small_cnn (trained)", trained, None, run_dir, args))
    precisions = precision_log_loss(run_dir, trained)
    table = markdown(latency, int8)
    print(table)
    return started.write(args.json, latency, table, int8=int8, precision_log_loss=precisions)


if __name__ == "__main__":
    main()
