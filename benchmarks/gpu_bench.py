"""The GPU check for a lent machine, in about 7 minutes, JAX only: each measure prints one ``RESULT``
line (``RESULT name value key=value ...``) and all of them land in results.json in --output-dir.

    python benchmarks/gpu_bench.py [--budget-seconds 420] [--output-dir reports/gpu]
    python benchmarks/gpu_bench.py --tiny            # the same path at toy sizes, on any CPU (tests)

Measures, in this order (a measure that would not fit in what is left of the budget is reported as
``skipped``):

- ``train_images_per_second``: EfficientNet-B0 at batch 256, mixed bfloat16, `model.fit` over uint8
  batches with Keras' asynchronous callback dispatch (every callback async-safe, as `kbench train`
  runs them under JAX: no host read of each step's loss); target >= 2,000 on an H100;
- ``step_sync``: the same fit's rate with a callback on the training thread (a host sync per step)
  over that rate: below 1 by what the asynchronous dispatch is worth;
- ``loader_images_per_second``: kbench's ImageLoader (decode, resize, augment) over generated JPEGs at 8
  and at 16 threads;
- ``keras_compiled_ms``: kbench's keras-compiled runtime (jax.jit over stateless_call), batch 1 and 32,
  timed host to host as `kbench latency` times every row;
- ``tf32_gap``: the forward pass at JAX's default precision (TF32 on Ampere and newer) against full
  float32 (kbench.core.backend.full_float32): its time ratio and the largest relative difference.

Keras must be importable: on a machine without it carry the wheels (benchmarks/gpu.sh installs them).
TensorFlow, ONNX Runtime and OpenVINO are never imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import record  # noqa: E402

FULL = {
    "backbone": "efficientnet_b0",
    "image_size": 224,
    "batch_size": 256,
    "steps": 30,
    "loader_images": 2048,
    "latency_runs": 50,
    "target_images_per_second": 2000,
}
TINY = {
    "backbone": "small_cnn",
    "image_size": 32,
    "batch_size": 8,
    "steps": 3,
    "loader_images": 32,
    "latency_runs": 3,
    "target_images_per_second": None,
}
LOADER_THREADS = (8, 16)
LATENCY_BATCHES = (1, 32)
# Seconds each measure may take at full size (compiling included), to skip what won't fit.
ESTIMATES = {"train": 150, "step_sync": 40, "loader": 30, "latency": 60, "tf32": 60}


class Results:
    """RESULT lines on stdout as they come, and results.json rewritten after each."""

    def __init__(self, output_dir: str, command: str, sizes: dict):
        self.path = os.path.join(output_dir, "results.json")
        os.makedirs(output_dir, exist_ok=True)
        self.record = {"command": command, "sizes": sizes, "machine": {}, "results": []}

    def add(self, name: str, value, **fields) -> None:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(" ".join(["RESULT", name, shown, *(f"{key}={item}" for key, item in fields.items())]), flush=True)
        self.record["results"].append({"name": name, "value": value, **fields})
        from kbench.core.files import write_json

        write_json(self.path, self.record)  # atomic: a run cut off by its time limit keeps the rows so far


def write_images(path: str, count: int) -> None:
    """``count`` JPEGs of about Kaggle's Dogs vs. Cats size (400 x 350) in a zip, Kaggle's names."""
    import cv2

    from kbench.data.synthetic import CLASSES, encode_jpeg, make_image

    def one(index):
        image = make_image(index % 2, 128, np.random.default_rng(index))
        return f"train/{CLASSES[index % 2]}.{index}.jpg", encode_jpeg(cv2.resize(image, (400, 350)))

    with ThreadPoolExecutor(os.cpu_count()) as pool, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in pool.map(one, range(count)):
            archive.writestr(name, data)


def loader_rate(images, sizes: dict, threads: int) -> float:
    """Images/s of one augmented epoch of kbench's ImageLoader with ``threads`` threads."""
    from kbench.data.loader import loader_throughput

    measured = loader_throughput(images, np.arange(len(images)), sizes["image_size"], sizes["batch_size"], threads)
    return measured["images_per_second"]


def fit_rate(model, pixels, labels, steps: int, asynchronous: bool) -> tuple[float, bool]:
    """Images/s of ``model.fit`` over ``steps`` copies of one batch (compiled beforehand), its batch
    callbacks dispatched by Keras to its own threads (``asynchronous``, as kbench runs them under JAX)
    or on the training thread (a host read of each step's logs); and whether Keras did dispatch them."""
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)

        def __len__(self):
            return steps

        def __getitem__(self, index):
            return pixels, labels

    class BatchEnd(keras.callbacks.Callback):  # like kbench's epoch clock: reads nothing of the step itself
        async_safe = asynchronous

        def on_train_batch_end(self, batch, logs=None):
            pass  # defined, so that Keras runs it on the training thread unless it is async-safe

    callbacks = keras.callbacks.CallbackList([BatchEnd()], add_history=True, model=model, epochs=1, steps=steps)
    start = time.perf_counter()
    model.fit(Batches(), epochs=1, verbose=0, callbacks=callbacks)
    # whether Keras dispatched them: its CallbackList's private flag (a benchmark may read it; kbench doesn't)
    return steps * len(labels) / (time.perf_counter() - start), callbacks._async_train


def train_model(sizes: dict, images):
    """The classifier compiled as kbench trains it, one uint8 batch from kbench's loader, and the train
    step compiled (two untimed steps)."""
    import keras

    from kbench.data.loader import ImageLoader
    from kbench.models.backbones import build_classifier, get_backbone

    model = build_classifier(get_backbone(sizes["backbone"]), 2, sizes["image_size"], "none")
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
    batch = sizes["batch_size"]
    loader = ImageLoader(images, np.arange(batch), sizes["image_size"], batch, pixel_dtype="uint8")
    pixels, labels = loader.batch(0, 0)
    loader.close()
    labels = labels.astype("float32")[:, None]
    fit_rate(model, pixels, labels, 2, asynchronous=True)  # compiles
    return model, pixels, labels


def measure_training(sizes: dict, images, precision: str | None, common: dict, results: Results, fits) -> None:
    """train_images_per_second (as kbench trains: Keras' asynchronous callback dispatch) and step_sync."""
    import keras

    from kbench.training.devices import training_devices

    try:
        shown = {**common, "batch": sizes["batch_size"], "precision": precision or "float32"}
        with training_devices(None, sizes["batch_size"], precision):
            model, pixels, labels = train_model(sizes, images)
            rate, dispatched = fit_rate(model, pixels, labels, sizes["steps"], asynchronous=True)
            target = sizes["target_images_per_second"]
            results.add("train_images_per_second", rate, **shown, target=target, asynchronous=dispatched)
            if fits("step_sync"):
                synced, dispatched = fit_rate(model, pixels, labels, sizes["steps"], asynchronous=False)
                results.add(
                    "step_sync",
                    synced / rate,
                    **shown,
                    synced_images_per_second=round(synced, 1),
                    asynchronous=dispatched,
                )
        del model
    except Exception as error:  # out of memory, a backend's own failure: the other measures go on
        results.add("train_images_per_second", "failed", why=f"{type(error).__name__}: {error}"[:200])
    keras.backend.clear_session()


def measure_latency(model, sizes: dict, common: dict, results: Results) -> None:
    """keras_compiled_ms at each of LATENCY_BATCHES, host to host as kbench latency times every row."""
    from kbench.core import timing
    from kbench.serving.runtimes import KerasCompiled

    runtime = KerasCompiled()
    runtime.prepare(model, (sizes["image_size"],) * 2)
    for batch in LATENCY_BATCHES:
        pixels = np.random.default_rng(batch).uniform(0, 255, (batch, *(sizes["image_size"],) * 2, 3))
        pixels = pixels.astype("float32")
        milliseconds = timing.time_calls(lambda p=pixels: runtime.run(p), sizes["latency_runs"], 5)
        stats = timing.stats(milliseconds)
        results.add("keras_compiled_ms", stats["p50_ms"], **common, batch=batch, p90_ms=round(stats["p90_ms"], 3))


def measure_tf32(model, sizes: dict, common: dict, results: Results) -> None:
    """tf32_gap: the forward at batch 32 at JAX's default precision against full float32."""
    import jax

    from kbench.core import timing
    from kbench.core.backend import full_float32
    from kbench.core.metrics import relative_difference

    pixels = np.random.default_rng(0).uniform(0, 255, (32, *(sizes["image_size"],) * 2, 3)).astype("float32")
    forward = jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=False)[0])
    weights = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])

    def run():
        return np.asarray(forward(*weights, pixels))

    default = run()
    default_ms = timing.stats(timing.time_calls(run, sizes["latency_runs"], 3))["p50_ms"]
    with full_float32():  # part of JAX's compilation key: compiled again at 'highest'
        full = run()
        full_ms = timing.stats(timing.time_calls(run, sizes["latency_runs"], 3))["p50_ms"]
    results.add(
        "tf32_gap",
        full_ms / default_ms,
        **common,
        batch=32,
        default_ms=round(default_ms, 3),
        float32_ms=round(full_ms, 3),
        relative_difference=f"{relative_difference(full, default):.2e}",
    )


def measure(args, results: Results) -> None:
    from kbench.core.backend import use_backend

    use_backend("jax")
    import jax
    import keras

    from kbench.core import machine
    from kbench.data.dataset import find_images
    from kbench.models.backbones import build_classifier, get_backbone
    from kbench.serving.runtimes import keras_device

    sizes = TINY if args.tiny else FULL
    device = keras_device()
    results.record["machine"] = {
        "device": device,
        "jax_devices": [str(d) for d in jax.devices()],
        "gpus": machine.list_gpus(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "keras": keras.__version__,
    }
    print(f"device {device}: {results.record['machine']['jax_devices']}", flush=True)
    end = time.time() + args.budget_seconds
    scale = 0.1 if args.tiny else 1.0

    def fits(name: str) -> bool:
        if time.time() + scale * ESTIMATES[name] <= end:
            return True
        results.add(name, "skipped", why=f"about {ESTIMATES[name]} s needed, the budget is spent")
        return False

    common = {"model": sizes["backbone"], "image_size": sizes["image_size"], "device": device}
    with tempfile.TemporaryDirectory(prefix="kbench-gpu-") as folder:
        data = os.path.join(folder, "train.zip")
        write_images(data, sizes["loader_images"])
        images = find_images(data)
        if fits("train"):
            # bfloat16 on the GPU; a CPU (the tiny run) trains in float32, as kbench train there without AMX
            precision = "bfloat16" if device.startswith("gpu") else None
            measure_training(sizes, images, precision, common, results, fits)
        if fits("loader"):
            for threads in LOADER_THREADS:
                rate = loader_rate(images, sizes, threads)
                results.add("loader_images_per_second", rate, threads=threads, images=len(images), cores=os.cpu_count())
        model = None
        if fits("latency"):
            model = build_classifier(get_backbone(sizes["backbone"]), 2, sizes["image_size"], "none")
            measure_latency(model, sizes, common, results)
        if fits("tf32"):
            model = model or build_classifier(get_backbone(sizes["backbone"]), 2, sizes["image_size"], "none")
            measure_tf32(model, sizes, common, results)
    results.add("imported_tensorflow", "tensorflow" in sys.modules)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (small_cnn at 32 px): the tests' CPU run")
    parser.add_argument("--budget-seconds", type=record.positive_int, default=420)
    parser.add_argument("--output-dir", default=os.path.join("reports", "gpu"))
    args = parser.parse_args(argv)
    backend = os.environ.get("KERAS_BACKEND", "jax")
    if backend != "jax":
        parser.error(f"this check runs under JAX only; KERAS_BACKEND is {backend!r} (unset it or set it to jax)")
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != "jax":
            parser.error("keras is already loaded with another backend in this process: run the script on its own")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    sizes = TINY if args.tiny else FULL
    results = Results(args.output_dir, record.command_line(__file__, argv), sizes)
    measure(args, results)
    return results.record


if __name__ == "__main__":
    main()
