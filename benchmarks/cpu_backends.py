"""Training-step time on the CPU: Keras on TensorFlow, on JAX as shipped, on JAX with XLA flags, and
in bfloat16 mixed precision (``tensorflow-bf16``, ``jax-bf16``; benchmarks/docs/cpu-bf16.md).

    python benchmarks/cpu_backends.py [--backbones mobilenet_v2,efficientnet_b0,resnet50]
        [--sizes 96,224] [--steps 3] [--max-step-seconds 20] [--settings tensorflow,jax]
        [--json benchmarks/results/cpu-backends/cpu_backends.json]

One training step = ``train_on_batch`` on a batch of 16 random pixels (in memory), Adam, every layer
trainable, one sigmoid unit. Each setting runs in its own process (Keras fixes the backend, XLA reads
``XLA_FLAGS``, once per process); inside it every backbone and size gets a warm-up step (which
compiles) and then ``--steps`` timed steps, of which the median is kept. Sizes run smallest first;
a larger size is skipped when the smaller one's step, scaled by the pixel count, predicts more than
``--max-step-seconds``, and timing stops after one step that takes longer. Writes the raw rows as
JSON and prints a markdown table with each setting's step time relative to TensorFlow's (a bf16
setting's: its float32 setting's step time over its own, the speed-up). Tiny mode, for tests:
--backbones small_cnn --sizes 32 --steps 1 --settings tensorflow.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import record  # noqa: E402
from kbench.core.errors import first_line  # noqa: E402

# What each setting puts in the worker's environment. The jax-* ones are the XLA CPU flags of this
# jaxlib (0.10.2) that could plausibly speed up convolutions; none beat the default (benchmarks/README.md).
SETTINGS = {
    "tensorflow": {"KERAS_BACKEND": "tensorflow"},
    "jax": {"KERAS_BACKEND": "jax"},
    "jax-fast-math": {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_cpu_enable_fast_math=true"},
    "jax-no-ynnpack": {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="},
    "jax-xnnpack-graph": {
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_cpu_use_xnnpack=true "
        "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    },
    "jax-eigen-1-thread": {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"},
}
# Settings that train under keras' mixed_bfloat16 policy, each beside its float32 setting.
BF16_SETTINGS = {"tensorflow-bf16": "tensorflow", "jax-bf16": "jax"}
SETTINGS.update({name: SETTINGS[base] for name, base in BF16_SETTINGS.items()})
DEFAULT_SETTINGS = "tensorflow,jax"


def build_model(backbone: str, image_size: int):
    """A binary classifier with random weights: kbench's own for registered names, else keras'."""
    import keras

    from kbench.models.backbones import REGISTRY, build_classifier

    if backbone in REGISTRY:
        return build_classifier(REGISTRY[backbone], 2, image_size, weights="none")
    constructor = {"resnet50": keras.applications.ResNet50}[backbone]  # not in kbench's registry
    features = constructor(weights=None, include_top=False, pooling="avg", input_shape=(image_size, image_size, 3))
    probability = keras.layers.Dense(1, activation="sigmoid", name="probability")(features.output)
    return keras.Model(features.input, probability, name=f"{backbone}_classifier")


def time_steps(
    backbone: str, image_size: int, batch_size: int, steps: int, max_step_seconds: float, policy: str = "float32"
) -> dict:
    import keras
    import numpy as np

    from kbench.core import timing

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model = build_model(backbone, image_size)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype("float32")
    labels = rng.integers(0, 2, (batch_size, 1)).astype("float32")

    def step():
        return model.train_on_batch(pixels, labels)  # the returned loss waits for the step to finish

    (first_ms,) = timing.time_calls(step, 1)  # compiles
    step_ms = timing.time_calls(step, steps, stop=lambda timings: timings[-1] > max_step_seconds * 1000)
    first_seconds = first_ms / 1000
    return {
        "first_step_s": round(first_seconds, 1),
        "step_ms": [round(ms, 1) for ms in step_ms],
        "median_ms": round(statistics.median(step_ms), 1),
    }


def worker(args) -> None:
    """Runs inside one setting's process; prints one JSON row per backbone and size as it goes."""
    from kbench.core.backend import use_backend

    backend = use_backend()  # from the environment the parent set
    policy = "mixed_bfloat16" if args.worker in BF16_SETTINGS else "float32"
    for backbone in args.backbones.split(","):
        previous = None  # (size, median ms) of the last size measured
        for size in sorted(int(s) for s in args.sizes.split(",")):
            row = {
                "setting": args.worker,
                "backend": backend,
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "backbone": backbone,
                "image_size": size,
                "batch_size": args.batch_size,
                "dtype_policy": policy,
            }
            predicted_ms = previous and previous[1] * (size / previous[0]) ** 2
            if predicted_ms and predicted_ms > args.max_step_seconds * 1000:
                row["skipped"] = (
                    f"a step at {previous[0]} px took {previous[1] / 1000:.1f} s, which predicts "
                    f"{predicted_ms / 1000:.0f} s at {size} px (over {args.max_step_seconds:g} s)"
                )
            else:
                try:
                    row.update(time_steps(backbone, size, args.batch_size, args.steps, args.max_step_seconds, policy))
                    previous = (size, row["median_ms"])
                except Exception as error:  # one failing case shouldn't lose the others
                    row["error"] = first_line(error, 200, named=True)
            print(json.dumps(row), flush=True)


def run_setting(name: str, environment: dict, args) -> list[dict]:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        name,
        "--backbones",
        args.backbones,
        "--sizes",
        args.sizes,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-step-seconds",
        str(args.max_step_seconds),
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **environment}
    if "XLA_FLAGS" not in environment:
        env.pop("XLA_FLAGS", None)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    print(f"{name}: {len(rows)} rows in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if done.returncode:
        print(f"{name} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    """One line per backbone and size; a column per setting: median step ms and the ratio to TF (for
    a bf16 setting: the speed-up over its float32 setting)."""
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    cases = list(dict.fromkeys((row["backbone"], row["image_size"]) for row in rows))
    by_key = {(row["setting"], row["backbone"], row["image_size"]): row for row in rows}
    lines = [
        "| backbone | px | " + " | ".join(f"{s} ms/step" for s in settings) + " |",
        "|---|---|" + "---|" * len(settings),
    ]
    for backbone, size in cases:
        reference = by_key.get(("tensorflow", backbone, size), {}).get("median_ms")
        cells = []
        for setting in settings:
            row = by_key.get((setting, backbone, size), {})
            if "median_ms" in row:
                float32 = by_key.get((BF16_SETTINGS.get(setting), backbone, size), {}).get("median_ms")
                if setting in BF16_SETTINGS:
                    ratio = f" (speed-up {float32 / row['median_ms']:.2f})" if float32 else ""
                else:
                    ratio = f" ({row['median_ms'] / reference:.1f}×)" if reference and setting != "tensorflow" else ""
                cells.append(f"{row['median_ms']:,.0f}{ratio}")
            else:
                cells.append("skipped" if "skipped" in row else ("error" if "error" in row else "-"))
        lines.append(f"| {backbone} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="mobilenet_v2,efficientnet_b0,resnet50")
    parser.add_argument("--sizes", type=record.positive_ints_text, default="96,224")
    parser.add_argument("--steps", type=record.positive_int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--batch-size", type=record.positive_int, default=16)
    parser.add_argument("--max-step-seconds", type=float, default=20.0)
    parser.add_argument(
        "--settings",
        default=DEFAULT_SETTINGS,
        help=f"comma-separated: {', '.join(SETTINGS)}, or NAME=XLA_FLAGS for JAX with other flags",
    )
    record.add_json_option(parser, "cpu_backends")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    began = record.Record(__file__, argv)

    rows = []
    for setting in args.settings.split(","):
        name, _, flags = setting.partition("=")
        environment = SETTINGS[name] if name in SETTINGS else {"KERAS_BACKEND": "jax", "XLA_FLAGS": flags}
        rows += run_setting(name, environment, args)
    table = markdown(rows)
    print(table)
    for row in rows:
        if "skipped" in row or "error" in row:
            print(f"- {row['setting']} {row['backbone']} {row['image_size']} px: {row.get('skipped') or row['error']}")
    return began.write(args.json, rows, table, settings=SETTINGS)


if __name__ == "__main__":
    main()
