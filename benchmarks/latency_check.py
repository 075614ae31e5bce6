"""Check kbench latency's method against a bare loop, for one backbone at batch 1.

    python benchmarks/latency_check.py [--backbone efficientnet_b0] [--runs 50] [--backend tensorflow]

Prints: kbench's rows for keras-predict, keras-compiled and onnxruntime-cpu, then a bare
``session.run`` loop over the same ONNX file, and the ratios the latency issue sets targets for.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kbench.backend import use_backend  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    backend = use_backend(args.backend)

    import onnxruntime

    from kbench.latency import LatencyConfig, iter_latency, machine_info, sample_pixels
    from kbench.report import format_table

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
        onnx_path = os.path.join(folder, f"{args.backbone}.onnx")
        session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        shape = session.get_inputs()[0].shape
        pixels = sample_pixels(1, (int(shape[1]), int(shape[2])))
        for _ in range(args.warmup):
            session.run(None, {name: pixels})
        bare = []
        for _ in range(args.runs):
            start = time.perf_counter()
            session.run(None, {name: pixels})
            bare.append((time.perf_counter() - start) * 1000)
    by_runtime = {row["runtime"]: row for row in rows}
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; backend {backend}; {machine['versions']}")
    print(
        format_table(
            rows,
            ["model", "runtime", "backend", "batch_size", "min_ms", "p50_ms", "p90_ms", "mean_ms", "detail"],
            style="markdown",
        )
    )
    bare_p50 = statistics.median(bare)
    print(f"\nbare session.run loop p50: {bare_p50:.2f} ms")
    print(f"kbench onnxruntime-cpu p50 / bare loop p50: {by_runtime['onnxruntime-cpu']['p50_ms'] / bare_p50:.3f}")
    print(
        f"keras-predict p50 / keras-compiled p50: "
        f"{by_runtime['keras-predict']['p50_ms'] / by_runtime['keras-compiled']['p50_ms']:.2f}x"
    )
    print(
        f"keras-compiled p50 / onnxruntime-cpu p50: "
        f"{by_runtime['keras-compiled']['p50_ms'] / by_runtime['onnxruntime-cpu']['p50_ms']:.2f}x"
    )


if __name__ == "__main__":
    main()
