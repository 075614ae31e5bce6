"""GPU benchmark for kbench, in one call: training images/s (in-memory and through the pipeline, with
and without mixed precision) and inference latency (Keras compiled against ONNX Runtime) for the
study's backbones. Prints a markdown table (with the device's name) to append to benchmarks/README.md,
and writes its rows as JSON.

    python benchmarks/gpu_bench.py [--backbones mobilenet_v2,efficientnet_b0] [--image-size 224]
        [--batch-size 64] [--steps 20] [--onnx-dir exports] [--budget-seconds 420] [-o table.md]
        [--json benchmarks/results/gpu_bench.json]

Runs under the JAX backend (the GPU machine has JAX with CUDA and no TensorFlow). ONNX files can't be
made there (tf2onnx needs TensorFlow): export them beforehand with `kbench export onnx` and pass
--onnx-dir; a backbone without a file gets an "unavailable" latency row. On a CPU it runs too (tests
use it at tiny sizes); mixed precision is then reported as refused, as kbench train refuses it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("KERAS_BACKEND", "jax")

from benchmarks import record  # noqa: E402
from kbench.backend import use_backend  # noqa: E402

COLUMNS = ["backbone", "measure", "mixed_precision", "batch_size", "value", "unit", "status"]


def device_name() -> str:
    import jax

    device = jax.devices()[0]
    return f"{device.platform}: {getattr(device, 'device_kind', str(device))}"


def train_rate(backbone: str, image_size: int, batch_size: int, steps: int, mixed: bool, loader=None) -> float:
    """Training images/s over ``steps`` timed steps after 2 warm-up steps (in-memory unless ``loader``)."""
    import keras

    from kbench.backbones import build_classifier, get_backbone

    keras.mixed_precision.set_global_policy("mixed_bfloat16" if mixed else "float32")
    try:
        model = build_classifier(get_backbone(backbone), 2, image_size, "none")
        model.compile(keras.optimizers.Adam(1e-4), "binary_crossentropy")
        rng = np.random.default_rng(0)
        pixels = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype(np.float32)
        labels = rng.integers(0, 2, (batch_size, 1)).astype(np.float32)

        def batch(step):
            if loader is None:
                return pixels, labels
            x, y = loader.batch(0, step % len(loader))
            return x, y.astype(np.float32)[:, None]

        for step in range(2):
            model.train_on_batch(*batch(step))
        start = time.perf_counter()
        for step in range(steps):
            loss = model.train_on_batch(*batch(step))
        float(np.asarray(loss))  # synchronise
        return steps * batch_size / (time.perf_counter() - start)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def latency_rows(backbone: str, image_size: int, onnx_dir: str | None, runs: int) -> list[dict]:
    import keras

    from kbench.backbones import build_classifier, get_backbone
    from kbench.latency import sample_pixels, time_runs
    from kbench.runtimes import KerasCompiled, OnnxRuntimeCUDA, Unavailable

    rows = []
    model = build_classifier(get_backbone(backbone), 2, image_size, "none")
    for batch in (1, 32):
        pixels = sample_pixels(batch, (image_size, image_size))
        compiled = KerasCompiled()
        compiled.prepare(model, (image_size, image_size))
        p50 = statistics.median(time_runs(compiled.run, pixels, runs, 5))
        rows.append({"backbone": backbone, "measure": f"keras-compiled p50 ({keras.backend.backend()})",
                     "batch_size": batch, "value": p50, "unit": "ms", "status": "ok"})
        path = os.path.join(onnx_dir or "", f"{backbone}.onnx")
        runtime = OnnxRuntimeCUDA()
        try:
            if not (onnx_dir and os.path.isfile(path)):
                raise Unavailable(f"no {path}: export it beforehand")
            runtime.prepare(path, (image_size, image_size))
            value = statistics.median(time_runs(runtime.run, pixels, runs, 5))
            rows.append({"backbone": backbone, "measure": "onnxruntime-cuda p50", "batch_size": batch,
                         "value": value, "unit": "ms", "status": "ok"})
        except Unavailable as reason:
            rows.append({"backbone": backbone, "measure": "onnxruntime-cuda p50", "batch_size": batch,
                         "status": f"unavailable: {reason}"})
    return rows


def write_table(rows: list[dict], header: str) -> str:
    from kbench.report import format_table

    return header + "\n\n" + format_table(rows, COLUMNS, style="markdown")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="mobilenet_v2,efficientnet_b0,inception_v3,xception")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--pipeline-images", type=int, default=1024)
    parser.add_argument("--onnx-dir", default=None)
    parser.add_argument("--budget-seconds", type=float, default=420, help="stop starting new backbones after this")
    parser.add_argument("-o", "--output", help="also write the markdown table here")
    record.add_json_option(parser, "gpu_bench")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive")
    began = record.Record(__file__, argv)
    use_backend("jax")
    import keras

    from kbench.backbones import get_backbone
    from kbench.data import ImageLoader, find_images
    from kbench.synthetic import write_kaggle_dataset

    backbones = [get_backbone(name).name for name in args.backbones.split(",")]
    accelerator = not str(keras.distribution.list_devices()[0]).lower().startswith("cpu")
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        data = write_kaggle_dataset(folder, n_train=args.pipeline_images, n_test=1, image_size=256)
        images = find_images(data["train"])
        loader = ImageLoader(images, np.arange(len(images)), args.image_size, args.batch_size, augment=True,
                             shuffle=True)
        for backbone in backbones:
            if time.perf_counter() - started > args.budget_seconds:
                rows.append({"backbone": backbone, "measure": "all", "status": "skipped: time budget spent"})
                continue
            for mixed in (False, True):
                label = "bfloat16" if mixed else "float32"
                if mixed and not accelerator:
                    rows.append({"backbone": backbone, "measure": "train images/s", "mixed_precision": label,
                                 "status": "refused on a CPU (kbench train refuses it too)"})
                    continue
                for source, feed in (("in-memory", None), ("pipeline", loader)):
                    rate = train_rate(backbone, args.image_size, args.batch_size, args.steps, mixed, feed)
                    rows.append({"backbone": backbone, "measure": f"train images/s ({source})",
                                 "mixed_precision": label, "batch_size": args.batch_size, "value": rate,
                                 "unit": "images/s", "status": "ok"})
            rows.extend(latency_rows(backbone, args.image_size, args.onnx_dir, args.latency_runs))
        loader.close()
    device = device_name()
    header = (f"Device: {device}; keras {keras.__version__}; image size {args.image_size}; "
              f"{time.perf_counter() - started:.0f} s")
    table = write_table(rows, header)
    print(table)
    if args.output:
        from kbench.files import write_text

        write_text(args.output, table + "\n")
    began.write(args.json, rows, table, device=device, image_size=args.image_size)
    return table


if __name__ == "__main__":
    main()
