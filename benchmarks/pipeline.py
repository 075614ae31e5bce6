"""Input-pipeline benchmark: is kbench's threaded OpenCV loader fast enough to keep training fed?

Two measurements, in one run on one machine:
1. images/s of ``ImageLoader`` (thread pool + prefetch) against a single-threaded loop like the
   reference study's (read, decode, resize, augment, one image after another);
2. training steps/s of a backbone fed by the loader against the same steps fed from an in-memory array.

    python benchmarks/pipeline.py [--backbone mobilenet_v2] [--images 512] [--steps 6]
        [--json benchmarks/results/pipeline/pipeline.json]

Images are generated JPEGs of about Kaggle's size (400 x 350 px), in a zip, so nothing is downloaded.
Prints a markdown table (measure, value, unit, target) and writes its rows as JSON. Tiny mode, for
tests: --backbone small_cnn --images 32 --image-size 32 --batch-size 8 --steps 1 --repeats 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zipfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import record  # noqa: E402
from kbench.core.backend import use_backend  # noqa: E402
from kbench.data.dataset import find_images  # noqa: E402
from kbench.data.loader import ImageLoader, augment, decode_image, loader_throughput, resize  # noqa: E402
from kbench.data.synthetic import CLASSES, encode_jpeg, make_image  # noqa: E402


def write_images(path: str, count: int, seed: int = 0) -> None:
    import cv2

    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for index in range(count):
            label = index % 2
            image = cv2.resize(make_image(label, 128, rng), (400, 350), interpolation=cv2.INTER_CUBIC)
            archive.writestr(f"train/{CLASSES[label]}.{index}.jpg", encode_jpeg(image))


def single_threaded(images, indices, image_size: int, seed: int) -> float:
    """The reference study's loop: one image after another on the calling thread. Returns images/s."""
    reader = images.reader()
    start = time.perf_counter()
    for index in indices:
        image = resize(decode_image(reader.read(images.keys[index])), image_size)
        augment(image, np.random.default_rng([seed, 0, int(index)]))
    return len(indices) / (time.perf_counter() - start)


def threaded(images, indices, image_size: int, batch_size: int, seed: int, workers: int | None) -> tuple:
    """(images/s, the loader's worker threads): kbench.data.loader.loader_throughput."""
    measured = loader_throughput(images, indices, image_size, batch_size, workers=workers, seed=seed)
    return measured["images_per_second"], measured["threads"]


def training_steps(images, indices, backbone: str, image_size: int, batch_size: int, steps: int, seed: int):
    """(steps/s from memory, from the loader, from the loader with --cache warm); the same model,
    interleaved blocks of steps."""
    import keras

    from kbench.core import timing
    from kbench.models.backbones import build_classifier, get_backbone

    model = build_classifier(get_backbone(backbone), 2, image_size, "none")
    model.compile(keras.optimizers.Adam(1e-4), "binary_crossentropy")
    loader = ImageLoader(images, indices, image_size, batch_size, augment=True, shuffle=True, seed=seed)
    pixels, labels = loader.batch(0, 0)
    labels = labels.astype("float32")[:, None]
    for _ in range(2):  # compile and warm up outside the timings
        model.train_on_batch(pixels, labels)

    def memory_step(step):
        return model.train_on_batch(pixels, labels)

    def loader_step(step):
        x, y = loader.batch(1, step % len(loader))
        return model.train_on_batch(x, y.astype("float32")[:, None])

    cached = ImageLoader(images, indices, image_size, batch_size, augment=True, shuffle=True, seed=seed, cache=True)
    for _ in cached:  # the first epoch fills the cache
        pass

    def cached_step(step):
        x, y = cached.batch(1, step % len(cached))
        return model.train_on_batch(x, y.astype("float32")[:, None])

    def block(step_function):
        return lambda: [step_function(step) for step in range(steps)]

    # interleaved to spread the machine's noise over all three: 4 rounds (two balanced pairs), one
    # timed block each, no untimed call first (the model is warm)
    blocks = {"memory": block(memory_step), "fed": block(loader_step), "warm": block(cached_step)}
    timings = timing.interleaved(blocks, rounds=4, runs=1, warmup=0, block_warmup=0)
    loader.close()
    cached.close()
    return tuple(statistics.median(1000 * steps / ms for ms in timings[name]) for name in blocks)


TARGET_SPEEDUP = 1.8  # the pipeline issue's targets
TARGET_STEP_COST_PERCENT = 5.0
COLUMNS = ["measure", "value", "unit", "target"]


def result_rows(result: dict, workers: int | None) -> list[dict]:
    """The table's rows, from the measured figures."""
    speedup, cost = result["pipeline_speedup"], result["pipeline_step_cost_percent"]
    return [
        {
            "measure": "single-threaded loop (the reference study's way)",
            "value": result["single_thread_images_per_second"],
            "unit": "images/s",
        },
        {
            "measure": f"kbench ImageLoader ({workers or 'default'} workers)",
            "value": result["pipeline_images_per_second"],
            "unit": "images/s",
        },
        {
            "measure": "speed-up",
            "value": speedup,
            "unit": "x",
            "target": f">= {TARGET_SPEEDUP} ({'met' if speedup >= TARGET_SPEEDUP else 'missed'})",
        },
        {"measure": "training steps/s, in-memory array", "value": result["memory_steps_per_second"], "unit": "steps/s"},
        {
            "measure": "training steps/s, fed by the pipeline",
            "value": result["pipeline_steps_per_second"],
            "unit": "steps/s",
        },
        {
            "measure": "cost of the pipeline to the step",
            "value": cost,
            "unit": "%",
            "target": f"< {TARGET_STEP_COST_PERCENT:g} ({'met' if cost < TARGET_STEP_COST_PERCENT else 'missed'})",
        },
        {
            "measure": "training steps/s, pipeline with --cache warm",
            "value": result["cached_pipeline_steps_per_second"],
            "unit": "steps/s",
        },
        {"measure": "cost with --cache warm", "value": result["cached_pipeline_step_cost_percent"], "unit": "%"},
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--images", type=record.positive_int, default=512)
    parser.add_argument("--image-size", type=record.positive_int, default=224)
    parser.add_argument("--batch-size", type=record.positive_int, default=32)
    parser.add_argument("--steps", type=record.positive_int, default=6, help="training steps per timed block")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=record.positive_int, default=3)
    record.add_json_option(parser, "pipeline")
    args = parser.parse_args(argv)
    began = record.Record(__file__, argv)
    backend = use_backend(args.backend)

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "train.zip")
        write_images(path, args.images)
        images = find_images(path)
        indices = np.arange(len(images))
        single = statistics.median(single_threaded(images, indices, args.image_size, s) for s in range(args.repeats))
        timed = [
            threaded(images, indices, args.image_size, args.batch_size, s, args.workers) for s in range(args.repeats)
        ]
        pooled, workers = statistics.median(rate for rate, _ in timed), timed[0][1]
        memory, fed, warm = training_steps(
            images, indices, args.backbone, args.image_size, args.batch_size, args.steps, 0
        )

    from kbench.core.tables import format_table

    result = {
        "backend": backend,
        "images": args.images,
        "image_size": args.image_size,
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "steps_per_block": args.steps,
        "workers": workers,
        "single_thread_images_per_second": single,
        "pipeline_images_per_second": pooled,
        "pipeline_speedup": pooled / single,
        "memory_steps_per_second": memory,
        "pipeline_steps_per_second": fed,
        "pipeline_step_cost_percent": 100 * (memory / fed - 1),
        "cached_pipeline_steps_per_second": warm,
        "cached_pipeline_step_cost_percent": 100 * (memory / warm - 1),
    }
    rows = result_rows(result, workers)
    table = format_table(rows, COLUMNS, style="markdown")
    print(table)
    return began.write(args.json, rows, table, result=result)


if __name__ == "__main__":
    main()
