"""Check kbench latency's method against a bare loop, for one backbone at batch 1.

    python benchmarks/latency_check.py [--backbone efficientnet_b0] [--runs 50] [--warmup 10]
        [--backend tensorflow] [--json benchmarks/results/latency/latency_check.json]

Prints two markdown tables: kbench's rows for keras-predict, keras-compiled and onnxruntime-cpu plus a
bare ``session.run`` loop over the same ONNX file; then the ratios the latency issue sets targets for.
Writes both as JSON (``rows`` and ``checks``). Tiny mode, for tests: --backbone small_cnn --runs 3
--warmup 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import record  # noqa: E402
from kbench.core.backend import use_backend  # noqa: E402

COLUMNS = ["model", "runtime", "backend", "batch_size", "runs", "min_ms", "p50_ms", "p90_ms", "mean_ms", "detail"]
CHECK_COLUMNS = ["check", "ratio", "target", "met"]
BARE = "bare session.run loop"


def bare_loop(onnx_path: str, runs: int, warmup: int) -> list[float]:
    """Milliseconds of each ``session.run`` on the same pixels kbench times, nothing around it."""
    import onnxruntime

    from kbench.core import timing
    from kbench.data.synthetic import sample_pixels

    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    shape = session.get_inputs()[0].shape
    pixels = sample_pixels(1, (int(shape[1]), int(shape[2])))
    return timing.time_calls(lambda: session.run(None, {name: pixels}), runs, warmup)


def _yes(met: bool) -> str:
    return "yes" if met else "no"


def checks(by_runtime: dict, backend: str) -> list[dict]:
    def p50(name):
        return by_runtime[name]["p50_ms"]

    onnx_over_bare = p50("onnxruntime-cpu") / p50(BARE)
    predict_over_compiled = p50("keras-predict") / p50("keras-compiled")
    # TensorFlow's predict() pays per-call overhead that a compiled call doesn't; JAX's predict is jitted.
    floor = 2.5 if backend == "tensorflow" else 1.0
    return [
        {
            "check": "kbench onnxruntime-cpu p50 / bare session.run p50",
            "ratio": onnx_over_bare,
            "target": "within 5 %",
            "met": _yes(abs(onnx_over_bare - 1) <= 0.05),
        },
        {
            "check": "keras-predict p50 / keras-compiled p50",
            "ratio": predict_over_compiled,
            "target": f">= {floor:g}x ({backend})",
            "met": _yes(predict_over_compiled >= floor),
        },
        {
            "check": "keras-compiled p50 / onnxruntime-cpu p50",
            "ratio": p50("keras-compiled") / p50("onnxruntime-cpu"),
            "target": "(information)",
        },
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--runs", type=record.positive_int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    record.add_json_option(parser, "latency_check")
    args = parser.parse_args(argv)
    began = record.Record(__file__, argv)
    backend = use_backend(args.backend)

    from kbench.core import timing
    from kbench.core.tables import format_table
    from kbench.serving.latency import LatencyConfig, iter_latency

    with tempfile.TemporaryDirectory() as folder:
        config = LatencyConfig(
            [args.backbone],
            ["keras-predict", "keras-compiled", "onnxruntime-cpu"],
            [1],
            args.runs,
            args.warmup,
            export_dir=folder,
        )
        rows = list(iter_latency(config))
        bare = bare_loop(os.path.join(folder, f"{args.backbone}.onnx"), args.runs, args.warmup)
    rows.append(
        {
            "model": args.backbone,
            "runtime": BARE,
            "backend": "onnxruntime",
            "batch_size": 1,
            "runs": args.runs,
            "warmup": args.warmup,
            **timing.stats(bare),
            "status": "ok",
        }
    )
    ratios = checks({row["runtime"]: row for row in rows}, backend)
    table = (
        format_table(rows, COLUMNS, style="markdown") + "\n\n" + format_table(ratios, CHECK_COLUMNS, style="markdown")
    )
    print(f"backend {backend}\n\n{table}")
    return began.write(args.json, rows, table, backend=backend, checks=ratios)


if __name__ == "__main__":
    main()
