"""GPU benchmark for kbench in one call, within a time budget: training images/s (from in-memory
arrays and through kbench's pipeline from JPEGs in a zip; float32 and mixed bfloat16; each batch
size; JAX and TensorFlow), Keras-compiled and ONNX Runtime CUDA latency, and the input pipeline's
images/s with all host cores. Writes gpu.md (tables for benchmarks/README.md, headed by the card's
name) and gpu.json into --output-dir, after every finished measure, so a killed run keeps its rows.

    python benchmarks/gpu_bench.py [--backbones efficientnet_b0,mobilenet_v2] [--batch-sizes 256,64]
        [--backends jax,tensorflow] [--budget-seconds 420] [--output-dir reports/gpu]

`benchmarks/gpu.sh` runs it with an 8-minute limit. Each backend trains in a subprocess of its own
(Keras fixes its backend per process) and the latency runs in a third; each gets a share of the
budget (--shares), measures in priority order (largest batch, first backbone, bfloat16 first) and
stops starting new measures when the next one would not fit; what didn't fit is reported as skipped.
Training is timed as `kbench train` runs it: `model.fit` over kbench's batches, one step after
another (kbench's epoch clock synchronises every step), after two untimed steps that compile.
On a CPU it runs too (the tests use it at tiny sizes); mixed precision is then refused where
`kbench train` refuses it (everywhere but bfloat16 on a CPU with native bf16).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import record  # noqa: E402
from kbench.core import machine  # noqa: E402
from kbench.core.errors import first_line  # noqa: E402
from kbench.core.process import child_death  # noqa: E402

TRAIN_COLUMNS = [
    "backend",
    "backbone",
    "precision",
    "batch_size",
    "device",
    "compile_seconds",
    "in_memory_images_per_second",
    "pipeline_images_per_second",
    "pipeline_share",
    "status",
]
LATENCY_COLUMNS = [
    "backbone",
    "runtime",
    "backend",
    "device",
    "batch_size",
    "p50_ms",
    "p90_ms",
    "images_per_second",
    "status",
]
PIPELINE_COLUMNS = ["measure", "threads", "images", "images_per_second", "status"]
DEFAULT_SHARES = "pipeline=0.04,train-jax=0.46,latency=0.2,train-tensorflow=0.3"
GRACE_SECONDS = 10  # past its share a worker is stopped; its unfinished measure is reported as skipped


# ---------------------------------------------------------------- data and the input pipeline


def write_images(path: str, count: int, workers: int) -> None:
    """``count`` JPEGs of about Kaggle's Dogs vs. Cats size (400 x 350) in a zip, Kaggle's names."""
    import cv2

    from kbench.data.synthetic import CLASSES, encode_jpeg, make_image

    def one(index):
        image = make_image(index % 2, 128, np.random.default_rng(index))
        return f"train/{CLASSES[index % 2]}.{index}.jpg", encode_jpeg(cv2.resize(image, (400, 350)))

    with ThreadPoolExecutor(workers) as pool, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in pool.map(one, range(count)):
            archive.writestr(name, data)


def pipeline_rows(data: str, image_size: int, batch_size: int) -> list[dict]:
    """Images/s of one augmented pass of kbench's ImageLoader with all host cores and with its default."""
    from kbench.data.dataset import find_images
    from kbench.data.loader import loader_throughput

    images = find_images(data)
    rows = []
    for label, workers in (("all host cores", os.cpu_count() or 1), ("kbench default", None)):
        measured = loader_throughput(images, np.arange(len(images)), image_size, batch_size, workers=workers)
        rows.append(
            {
                "measure": f"decode, resize, augment ({label})",
                "threads": measured["threads"],
                "images": measured["images"],
                "images_per_second": measured["images_per_second"],
                "status": "ok",
            }
        )
    return rows


# ---------------------------------------------------------------- the training worker


def train_plan(args) -> list[tuple[str, str, int]]:
    """(backbone, precision, batch size) in priority order."""
    return [
        (backbone, precision, batch)
        for batch in args.batch_sizes
        for backbone in args.backbones
        for precision in args.precisions
    ]


def timed_fit(model, batches, batch_size: int, max_steps: int, max_seconds: float) -> float:
    """Images/s of ``model.fit`` over ``batches`` (a keras PyDataset), timed from the end of its
    second step to the end of its last, at most ``max_steps`` timed steps or ``max_seconds``."""
    import keras

    class Clock(keras.callbacks.Callback):
        start, steps = None, 0

        def on_train_batch_end(self, batch, logs=None):  # logs arrive synchronised, as in kbench train
            now = time.perf_counter()
            if batch == 1:
                self.start = now
            elif batch > 1:
                self.steps, self.end = batch - 1, now
                if self.steps >= max_steps or now - self.start > max_seconds:
                    self.model.stop_training = True

    clock = Clock()
    model.fit(batches, epochs=1, verbose=0, callbacks=[clock])
    if not clock.steps:
        raise RuntimeError(f"too few batches to time ({len(batches)}; 3 or more needed)")
    return clock.steps * batch_size / (clock.end - clock.start)


def measure_training(backbone: str, batch_size: int, args, images) -> dict:
    """One model: compile, then images/s from a fixed in-memory batch and through kbench's pipeline."""
    import keras

    from kbench.data.loader import ImageLoader
    from kbench.models.backbones import build_classifier, get_backbone
    from kbench.training.train import epoch_batches

    model = build_classifier(get_backbone(backbone), 2, args.image_size, "none")
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy", metrics=["accuracy"])
    first = ImageLoader(images, np.arange(batch_size), args.image_size, batch_size)  # one batch, no prefetch
    pixels, labels = first.batch(0, 0)
    first.close()
    labels = labels.astype("float32")[:, None]

    class InMemory(keras.utils.PyDataset):
        def __init__(self, length):
            super().__init__(workers=1, use_multiprocessing=False)
            self.length = length

        def __len__(self):
            return self.length

        def __getitem__(self, index):
            return pixels, labels

    start = time.perf_counter()
    model.fit(InMemory(2), epochs=1, verbose=0)  # compiles the train step, for both feeds
    compile_seconds = time.perf_counter() - start
    loader = ImageLoader(images, np.arange(len(images)), args.image_size, batch_size, augment=True, shuffle=True)
    steps = len(loader)
    try:
        in_memory = timed_fit(model, InMemory(steps), batch_size, args.steps, args.measure_seconds)
        fed = timed_fit(model, epoch_batches(loader, 1, True), batch_size, args.steps, args.measure_seconds)
    finally:
        loader.close()
    from kbench.serving.runtimes import keras_device

    return {
        "device": keras_device(),
        "compile_seconds": compile_seconds,
        "in_memory_images_per_second": in_memory,
        "pipeline_images_per_second": fed,
        "pipeline_share": fed / in_memory,
        "status": "ok",
    }


def run_train_worker(args) -> None:
    from kbench.core.backend import use_backend

    use_backend(args.backend)
    import keras

    from kbench.core.errors import KbenchError
    from kbench.data.dataset import find_images
    from kbench.training.devices import training_devices

    images = find_images(args.data)
    took: dict[str, float] = {}
    for backbone, precision, batch in train_plan(args):
        row = {"backend": args.backend, "backbone": backbone, "precision": precision, "batch_size": batch}
        estimate = took.get(backbone, min(took.values(), default=0.0))
        if time.time() + estimate > args.deadline:
            emit({**row, "status": f"skipped: its share of the budget is spent (about {estimate:.0f} s needed)"})
            continue
        start = time.time()
        try:
            with training_devices(None, batch, None if precision == "float32" else precision):
                row.update(measure_training(backbone, batch, args, images))
        except KbenchError as error:
            row["status"] = f"refused: {error}"
        except Exception as error:  # out of memory at batch 256, a backend's own failure: the others go on
            row["status"] = f"failed: {first_line(error, named=True)}"
        took[backbone] = max(took.get(backbone, 0.0), time.time() - start)
        emit(row)
        keras.backend.clear_session()
        gc.collect()


# ---------------------------------------------------------------- the latency worker


def export_on_cpu(keras_path: str, onnx_path: str) -> str | None:
    """Export with kbench's checked ONNX export in a CPU-only TensorFlow process (the parity check
    then compares float32 on both sides); None if it worked, else why not."""
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "cli.py"),
            "export",
            "onnx",
            keras_path,
            "-o",
            onnx_path,
            "--backend",
            "tensorflow",
        ],
        capture_output=True,
        text=True,
        env=environment,
    )
    return child_death(done.returncode, done.stderr, silent=f"exit code {done.returncode}")


def run_latency_worker(args) -> None:
    from kbench.core.backend import use_backend

    use_backend(args.backend)
    import onnxruntime

    from kbench.models.backbones import build_classifier, get_backbone
    from kbench.models.settle import settle_random_weights
    from kbench.serving.latency import LatencyConfig, iter_latency

    cuda_listed = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    took = 0.0
    with tempfile.TemporaryDirectory(prefix="kbench-gpu-latency-") as scratch:
        for backbone in args.backbones:
            base = {"backbone": backbone}
            if time.time() + took > args.deadline:
                emit({**base, "runtime": "all", "status": "skipped: its share of the budget is spent"})
                continue
            start = time.time()
            keras_path = os.path.join(scratch, f"{backbone}.keras")
            model = build_classifier(get_backbone(backbone), 2, args.image_size, "none")
            settle_random_weights(model)  # random weights made numerically tame: see its docstring
            model.save(keras_path)
            runtimes, why_not = ["keras-compiled"], None
            carried = os.path.join(args.onnx_dir or "", f"{backbone}.onnx")
            if not cuda_listed:
                why_not = "onnxruntime-gpu is not installed here (`make install CUDA=1` installs it)"
            elif args.onnx_dir and os.path.isfile(carried):
                pass  # timed below from the file exported beforehand
            else:
                why_not = export_on_cpu(keras_path, os.path.join(scratch, f"{backbone}.onnx"))
                why_not = f"ONNX export failed: {why_not}" if why_not else None
                runtimes += [] if why_not else ["onnxruntime-cuda"]
            config = LatencyConfig(
                [keras_path],
                runtimes,
                args.latency_batch_sizes,
                args.latency_runs,
                args.latency_warmup,
                export_dir=scratch,
            )
            rows = list(iter_latency(config))
            if cuda_listed and args.onnx_dir and os.path.isfile(carried):
                rows += list(
                    iter_latency(
                        LatencyConfig(
                            [carried],
                            ["onnxruntime-cuda"],
                            args.latency_batch_sizes,
                            args.latency_runs,
                            args.latency_warmup,
                        )
                    )
                )
            for row in rows:
                emit({**base, **{key: row.get(key) for key in LATENCY_COLUMNS if key in row}})
            if why_not:
                for batch in args.latency_batch_sizes:
                    emit(
                        {
                            **base,
                            "runtime": "onnxruntime-cuda",
                            "batch_size": batch,
                            "status": f"unavailable: {why_not}",
                        }
                    )
            took = max(took, time.time() - start)


# ---------------------------------------------------------------- the parent: workers, budget, report


def emit(row: dict) -> None:
    """Worker -> parent: one row as one line on stdout."""
    print("ROW " + json.dumps(row), flush=True)


def run_worker(kind: str, backend: str, deadline: float, args, on_row) -> str | None:
    """Run a worker subprocess until it ends or ``deadline`` + grace passes; ``on_row`` gets each row.
    Returns None, or why the worker stopped early."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        kind,
        "--backend",
        backend,
        "--deadline",
        str(deadline),
        "--data",
        args.data,
        *args.passed,
    ]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    if kind == "latency":  # JAX and ONNX Runtime share the GPU: JAX takes memory as it needs it
        environment["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment)
    lines: queue.Queue = queue.Queue()

    def read():  # a thread, so that the parent can stop waiting at the deadline
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline + GRACE_SECONDS - time.time()))
        except queue.Empty:
            process.kill()
            process.wait()
            return f"stopped at the end of its share ({kind} {backend})"
        if line is None:
            break
        if line.startswith("ROW "):
            on_row(json.loads(line[4:]))
    process.wait()
    failure = child_death(process.returncode, None, silent=f"exited with code {process.returncode}")
    return None if failure is None else f"{kind} {backend} worker: {failure}"


def host_facts(gpus: list[dict]) -> dict:
    return {"gpus": gpus, "cpu": machine.cpu().model, "cores": os.cpu_count(), "versions": machine.versions()}


def write_report(result: dict, output_dir: str) -> str:
    from kbench.core.files import write_text
    from kbench.core.tables import format_table

    host = result["machine"]
    card = "; ".join(f"{g['name']} ({g['memory_mib']} MiB, driver {g['driver']})" for g in host["gpus"])
    versions = ", ".join(f"{name} {version}" for name, version in host["versions"].items())
    budgets = ", ".join(
        f"{group} {share * result['budget_seconds']:.0f} s" for group, share in result["shares"].items()
    )
    parts = [
        f"Device: {card or 'CPU only (no GPU listed by nvidia-smi)'}; host {host['cpu']}, {host['cores']} cores",
        f"{versions}; image size {result['image_size']}; {result['seconds']:.0f} s of a "
        f"{result['budget_seconds']:.0f} s budget ({budgets})",
        "",
        "Training (images/s; pipeline_share = through kbench's pipeline / in-memory)",
        "",
        format_table(result["train"], TRAIN_COLUMNS, style="markdown"),
        "",
        "Inference latency (ms)",
        "",
        format_table(result["latency"], LATENCY_COLUMNS, style="markdown"),
        "",
        "Input pipeline (JPEGs in a zip, 400 x 350 px)",
        "",
        format_table(result["pipeline"], PIPELINE_COLUMNS, style="markdown"),
    ]
    if result["notes"]:
        parts += ["", *(f"- {note}" for note in result["notes"])]
    table = "\n".join(parts) + "\n"
    os.makedirs(output_dir, exist_ok=True)
    write_text(os.path.join(output_dir, "gpu.md"), table)
    write_text(os.path.join(output_dir, "gpu.json"), json.dumps(result, indent=2) + "\n")
    return table


def _shares(text: str, groups: list[str]) -> dict[str, float]:
    given = dict(part.split("=") for part in text.split(","))
    shares = {group: float(given.get(group, 0.0)) for group in groups}
    total = sum(shares.values()) or 1.0
    return {group: share / total for group, share in shares.items()}


def main(argv=None) -> str:
    args = parse(argv)
    if args.worker:
        (run_train_worker if args.worker == "train" else run_latency_worker)(args)
        return ""
    import importlib.util

    started = time.time()
    end = started + args.budget_seconds
    backends = [b for b in args.backends if b != "tensorflow" or importlib.util.find_spec("tensorflow")]
    groups = [
        "pipeline",
        *([f"train-{backends[0]}", "latency", *(f"train-{b}" for b in backends[1:])] if backends else []),
    ]
    shares = _shares(args.shares, groups)
    result = {
        "command": record.command_line(__file__, argv),  # benchmarks/README.md quotes it under the tables
        "machine": host_facts(machine.gpu_details()),
        "image_size": args.image_size,
        "budget_seconds": args.budget_seconds,
        "shares": shares,
        "seconds": 0.0,
        "train": [],
        "latency": [],
        "pipeline": [],
        "notes": [],
    }
    if "tensorflow" in args.backends and "tensorflow" not in backends:
        result["notes"].append("TensorFlow is not installed here: no TensorFlow training rows")

    def save():
        result["seconds"] = time.time() - started
        return write_report(result, args.output_dir)

    with tempfile.TemporaryDirectory(prefix="kbench-gpu-") as folder:
        args.data = os.path.join(folder, "train.zip")
        write_images(args.data, args.pipeline_images, os.cpu_count() or 1)
        deadline = started
        for group in groups:
            deadline = min(end, deadline + shares[group] * args.budget_seconds)
            if group == "pipeline":
                result["pipeline"] = pipeline_rows(args.data, args.image_size, max(args.batch_sizes))
            else:
                kind, backend = ("latency", backends[0]) if group == "latency" else ("train", group.split("-", 1)[1])

                def keep(row, rows=result[kind]):
                    rows.append(row)
                    save()

                stopped = run_worker(kind, backend, deadline, args, keep)
                result["notes"] += [stopped] if stopped else []
            if group.startswith("train-"):
                done = {
                    (r["backbone"], r["precision"], r["batch_size"]) for r in result["train"] if r["backend"] == backend
                }
                result["train"] += [
                    {
                        "backend": backend,
                        "backbone": b,
                        "precision": p,
                        "batch_size": n,
                        "status": "skipped: its share of the budget ran out while it ran",
                    }
                    for b, p, n in train_plan(args)
                    if (b, p, n) not in done
                ]
            save()
    table = save()
    print(table)
    return table


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", type=_names, default=_names("efficientnet_b0,mobilenet_v2"))
    parser.add_argument("--image-size", type=record.positive_int, default=224)
    parser.add_argument(
        "--batch-sizes", type=record.positive_ints, default=[256, 64], help="training, in priority order"
    )
    parser.add_argument("--precisions", type=_names, default=["bfloat16", "float32"])
    parser.add_argument(
        "--backends",
        type=_names,
        default=["jax", "tensorflow"],
        help="training backends; the first also times the latency",
    )
    parser.add_argument("--steps", type=record.positive_int, default=30, help="most timed training steps per feed")
    parser.add_argument("--measure-seconds", type=float, default=6.0, help="most timed seconds per feed")
    parser.add_argument(
        "--pipeline-images", type=record.positive_int, default=4096, help="JPEGs in the zip (one epoch)"
    )
    parser.add_argument("--latency-batch-sizes", type=record.positive_ints, default=[1, 32])
    parser.add_argument("--latency-runs", type=record.positive_int, default=50)
    parser.add_argument("--latency-warmup", type=int, default=5)
    parser.add_argument("--onnx-dir", help="NAME.onnx files exported beforehand (where this machine can't export)")
    parser.add_argument("--budget-seconds", type=float, default=420)
    parser.add_argument("--shares", default=DEFAULT_SHARES, help="each group's share of the budget")
    parser.add_argument("--output-dir", default=os.path.join("reports", "gpu"))
    parser.add_argument("--worker", choices=["train", "latency"], help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.latency_runs < 1 or args.pipeline_images < 3 * max(args.batch_sizes):
        parser.error("--steps and --latency-runs must be positive, --pipeline-images at least 3 x the largest batch")
    unknown = set(args.precisions) - {"float32", "bfloat16", "float16"}
    if unknown or set(args.backends) - {"jax", "tensorflow"}:
        parser.error("--precisions: float32, bfloat16, float16; --backends: jax, tensorflow")
    args.passed = list(argv if argv is not None else sys.argv[1:])  # what the workers are given
    return args


if __name__ == "__main__":
    main()
