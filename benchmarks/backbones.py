"""Every registered keras.applications backbone, at its native size: parameters, GFLOPs, ONNX export
(seconds, parity with Keras, file size) and p50 latency at batch 1 and 32 for keras-compiled
(TensorFlow) and ONNX Runtime CPU, then the Pareto picture of ImageNet top-1 against ONNX Runtime
latency.

    python benchmarks/backbones.py [--backbones 'convnext_*,resnet50'] [--batch-sizes 1,32]
        [--budget-seconds 20] [--image-size N] [--resume] [--json benchmarks/results/backbones/backbones.json]

Each backbone runs in its own TensorFlow process (a crash or the kernel's OOM killer costs one row,
not the table), with random weights (seeded; latency doesn't depend on them) as the headless model with
average pooling that kbench's classifiers and ensembles share: parity is measured on its pooled
features, whose scale shows differences a probability would hide. A row that fails says why
("out of memory" where the machine's memory was the limit). Rows are kept in the JSON as they finish;
``--resume`` keeps the rows already there. Latency: one untimed warm-up call, then timed calls until at
least 3 and 2 s, or one call past ``--budget-seconds`` (the biggest models at batch 32); the row
records how many. Tiny mode, for tests: --backbones mobilenet_v3_small --image-size 32
--batch-sizes 1,2 --no-plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import record  # noqa: E402
from kbench.core import files  # noqa: E402
from kbench.core.errors import first_line  # noqa: E402
from kbench.models.backbones import REGISTRY, list_backbones  # noqa: E402

# ImageNet-1k validation top-1 of the keras.applications weights, as their publishers state it:
#   [keras] keras.io/api/applications, "Available models" (keras-io: templates/api/applications/index.md)
#   [keras-mnv3] keras' mobilenet_v3.py docstring table (mobilenet_v3_{large,small}_1.0_224)
#   [convnext] Liu et al., "A ConvNet for the 2020s" (CVPR 2022), Tables 1-2 at 224 px; keras ships the
#              ImageNet-1k weights for tiny/small and the ImageNet-22k -> 1k ones for base/large/xlarge
#              (keras' convnext.py docstring), so those rows are the 22k figures.
TOP1 = {
    "xception": (79.0, "keras"),
    "vgg16": (71.3, "keras"),
    "vgg19": (71.3, "keras"),
    "resnet50": (74.9, "keras"),
    "resnet50_v2": (76.0, "keras"),
    "resnet101": (76.4, "keras"),
    "resnet101_v2": (77.2, "keras"),
    "resnet152": (76.6, "keras"),
    "resnet152_v2": (78.0, "keras"),
    "inception_v3": (77.9, "keras"),
    "inception_resnet_v2": (80.3, "keras"),
    "mobilenet": (70.4, "keras"),
    "mobilenet_v2": (71.3, "keras"),
    "densenet121": (75.0, "keras"),
    "densenet169": (76.2, "keras"),
    "densenet201": (77.3, "keras"),
    "nasnet_mobile": (74.4, "keras"),
    "nasnet_large": (82.5, "keras"),
    "efficientnet_b0": (77.1, "keras"),
    "efficientnet_b1": (79.1, "keras"),
    "efficientnet_b2": (80.1, "keras"),
    "efficientnet_b3": (81.6, "keras"),
    "efficientnet_b4": (82.9, "keras"),
    "efficientnet_b5": (83.6, "keras"),
    "efficientnet_b6": (84.0, "keras"),
    "efficientnet_b7": (84.3, "keras"),
    "efficientnet_v2_b0": (78.7, "keras"),
    "efficientnet_v2_b1": (79.8, "keras"),
    "efficientnet_v2_b2": (80.5, "keras"),
    "efficientnet_v2_b3": (82.0, "keras"),
    "efficientnet_v2_s": (83.9, "keras"),
    "efficientnet_v2_m": (85.3, "keras"),
    "efficientnet_v2_l": (85.7, "keras"),
    "mobilenet_v3_large": (75.6, "keras-mnv3"),
    "mobilenet_v3_small": (68.1, "keras-mnv3"),
    "convnext_tiny": (82.1, "convnext"),
    "convnext_small": (83.1, "convnext"),
    "convnext_base": (85.8, "convnext"),
    "convnext_large": (86.6, "convnext"),
    "convnext_xlarge": (87.0, "convnext"),
}
RUNTIMES = ("keras-compiled", "onnxruntime-cpu")
MEMORY_WORDS = ("out of memory", "resourceexhausted", "oom", "bad_alloc", "memoryerror", "cannot allocate")


def timed_calls(run, pixels, budget_seconds: float) -> list[float]:
    """Milliseconds of each timed call (at most 30), after one untimed warm-up: at least 3 and 2 s of
    them, or ``budget_seconds`` of them."""
    from kbench.core import timing

    def spent(timings: list[float]) -> bool:
        seconds = sum(timings) / 1000
        return (len(timings) >= 3 and seconds >= 2) or seconds >= budget_seconds

    return timing.time_calls(lambda: run(pixels), 30, warmup=1, stop=spent)


def measure_one(name: str, image_size: int | None, batch_sizes: list[int], budget_seconds: float) -> dict:
    """One backbone, in this (TensorFlow) process."""
    import keras

    from kbench.data.synthetic import sample_pixels
    from kbench.export.onnx import export_onnx
    from kbench.models.backbones import build_feature_extractor, count_flops, get_backbone
    from kbench.models.settle import settle_random_weights
    from kbench.serving.runtimes import make_runtime

    spec = get_backbone(name)
    size = image_size or spec.image_size
    keras.utils.set_random_seed(0)
    model = build_feature_extractor(spec, size)
    settled = settle_random_weights(model)  # random weights made numerically tame: see its docstring
    row = {"backbone": name, "image_size": size, "params": model.count_params(), "gflops": count_flops(model) / 1e9}
    row.update(batch_norm_calibrated=settled["calibrated"], float32_sensitivity=settled["sensitivity"])
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"{name}.onnx")
        exported = export_onnx(model, path)
        row.update(
            export_seconds=exported["export_seconds"],
            max_relative_difference=exported["max_relative_difference"],
            onnx_megabytes=exported["megabytes"],
        )
        for runtime_name in RUNTIMES:
            runtime = make_runtime(runtime_name)
            runtime.prepare(model if runtime.needs == "keras" else path, (size, size))
            for batch in batch_sizes:
                key = f"{runtime_name}_b{batch}"
                try:
                    timings = timed_calls(runtime.run, sample_pixels(batch, (size, size)), budget_seconds)
                except Exception as error:  # one cell fails; the row says why
                    row[f"{key}_ms"] = None
                    row[f"{key}_error"] = _why(error)
                    continue
                row[f"{key}_ms"] = statistics.median(timings)
                row[f"{key}_runs"] = len(timings)
            row[f"{runtime_name}_detail"] = runtime.detail
    return row


def _why(error: BaseException) -> str:
    text = first_line(error, 200, named=True)
    return "out of memory" if any(word in text.lower() for word in MEMORY_WORDS) else text


def run_isolated(name: str, args, folder: str) -> dict:
    """``measure_one`` in a fresh TensorFlow process; a crash or kill becomes the row's error."""
    output = os.path.join(folder, f"{name}.json")
    command = [sys.executable, os.path.abspath(__file__), "--one", name, "--one-output", output]
    command += ["--batch-sizes", args.batch_sizes, "--budget-seconds", str(args.budget_seconds)]
    if args.image_size:
        command += ["--image-size", str(args.image_size)]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout_seconds)
    if done.returncode == 0 and os.path.isfile(output):
        with open(output) as handle:
            row = json.load(handle)
    else:
        tail = [line for line in done.stderr.splitlines() if line.strip()][-1:] or [f"exit {done.returncode}"]
        killed = done.returncode in (-9, 137)  # the kernel's OOM killer sends SIGKILL
        row = {"backbone": name, "error": "out of memory (killed)" if killed else _why(RuntimeError(tail[0]))}
    row["wall_seconds"] = time.perf_counter() - started
    return row


def _ms(row: dict, key: str) -> str:
    value = row.get(f"{key}_ms")
    if value is None:
        return row.get(f"{key}_error", "-")
    runs = row.get(f"{key}_runs")
    return f"{value:.1f}" + (f" ({runs})" if runs is not None and runs < 3 else "")


def header(batch_sizes: list[int]) -> str:
    cells = [f"{runtime} b{batch} p50 ms" for runtime in ("keras TF", "ORT CPU") for batch in batch_sizes]
    columns = ["backbone", "size", "params M", "GFLOPs", "top-1 %", "export s", "parity", "ONNX MB", *cells]
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def table_line(row: dict, batch_sizes: list[int]) -> str:
    top1 = TOP1.get(row["backbone"], (None, ""))[0]
    if "error" in row:
        return f"| {row['backbone']} | | | | {top1 or ''} | failed: {row['error']} |"
    cells = [_ms(row, f"{runtime}_b{batch}") for runtime in RUNTIMES for batch in batch_sizes]
    return (
        f"| {row['backbone']} | {row['image_size']} | {row['params'] / 1e6:.1f} | {row['gflops']:.2f} "
        f"| {top1 if top1 is not None else '-'} | {row['export_seconds']:.0f} "
        f"| {row['max_relative_difference']:.1e} | {row['onnx_megabytes']:.1f} | " + " | ".join(cells) + " |"
    )


def pareto_front(points: list[tuple[float, float, str]]) -> list[str]:
    """Names no other point beats on both latency (lower) and accuracy (higher)."""
    front, best = [], float("-inf")
    for _latency, accuracy, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append(name)
            best = accuracy
    return front


def plot(rows: list[dict], path: str, batch: int = 1) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"onnxruntime-cpu_b{batch}_ms"
    points = [(r[key], TOP1[r["backbone"]][0], r["backbone"]) for r in rows if r.get(key) and r["backbone"] in TOP1]
    front = pareto_front(points)
    figure, axes = plt.subplots(figsize=(10, 6.5))
    for latency, accuracy, name in points:
        on_front = name in front
        axes.scatter(latency, accuracy, s=36, color="tab:red" if on_front else "tab:blue", zorder=3)
        axes.annotate(name, (latency, accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    line = sorted((p for p in points if p[2] in front), key=lambda p: p[0])
    axes.plot([p[0] for p in line], [p[1] for p in line], color="tab:red", linewidth=1, label="Pareto front")
    axes.set_xscale("log")
    axes.set_xlabel(f"ONNX Runtime CPU p50 latency, batch {batch}, native size (ms, log scale)")
    axes.set_ylabel("ImageNet top-1 (%) as published for the keras weights")
    axes.set_title("keras.applications backbones: accuracy against serving cost on this machine")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with files.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)
    return front


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="*", help="comma-separated names or shell patterns")
    parser.add_argument(
        "--image-size", type=record.positive_int, default=None, help="default: each backbone's native size"
    )
    parser.add_argument("--batch-sizes", type=record.positive_ints_text, default="1,32")
    parser.add_argument("--budget-seconds", type=float, default=20.0)
    parser.add_argument("--timeout-seconds", type=float, default=1800.0, help="per backbone")
    parser.add_argument("--resume", action="store_true", help="keep rows already in the JSON")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--one-output", help=argparse.SUPPRESS)
    record.add_json_option(parser, "backbones")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.one:
        files.write_json(args.one_output, measure_one(args.one, args.image_size, batch_sizes, args.budget_seconds))
        return None

    names = []
    for pattern in args.backbones.split(","):
        matched = [s.name for s in list_backbones(pattern) if s.application]
        if not matched:
            parser.error(f"no keras.applications backbone matches {pattern!r}")
        names += [name for name in matched if name not in names]
    names.sort(key=lambda name: REGISTRY[name].gflops)  # cheapest first: a cut-short run misses the biggest
    began = record.Record(__file__, argv)
    kept = {}
    if args.resume and os.path.isfile(args.json):
        with open(args.json) as handle:
            kept = {row["backbone"]: row for row in json.load(handle)["rows"] if "error" not in row}
    print(header(batch_sizes), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            row = kept.get(name) or run_isolated(name, args, folder)
            rows.append(row)
            print(table_line(row, batch_sizes), flush=True)
            began.write(args.json, rows, "(partial)", batch_sizes=batch_sizes, top1_sources=_SOURCES)
    order = {name: index for index, name in enumerate(REGISTRY)}
    rows.sort(key=lambda row: order[row["backbone"]])
    table = "\n".join([header(batch_sizes), *(table_line(row, batch_sizes) for row in rows)])
    extra = {"batch_sizes": batch_sizes, "top1_sources": _SOURCES}
    if not args.no_plot:
        png = os.path.splitext(args.json)[0] + ".png"
        extra["pareto_front"] = plot(rows, png)
        extra["plot"] = os.path.relpath(png, record.REPO)
    return began.write(args.json, rows, table, **extra)


_SOURCES = {
    "keras": "https://keras.io/api/applications/ (keras-io templates/api/applications/index.md)",
    "keras-mnv3": "keras/src/applications/mobilenet_v3.py docstring, mobilenet_v3_*_1.0_224",
    "convnext": "Liu et al., A ConvNet for the 2020s, CVPR 2022, Tables 1-2 (224 px; B/L/XL from ImageNet-22k)",
}


if __name__ == "__main__":
    main()
