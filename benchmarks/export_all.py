"""Export every registered backbone (as a binary classifier at its native size, random weights) to
ONNX through ``kbench.export.export_onnx`` and record the time and the parity with Keras.

    python benchmarks/export_all.py [--backend tensorflow] [--backbones a,b] [-o rows.json]

Prints one markdown row per backbone as it goes (to paste into benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kbench.backbones import REGISTRY, build_classifier, get_backbone  # noqa: E402
from kbench.backend import use_backend  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None)
    parser.add_argument("--backbones", default=",".join(REGISTRY))
    parser.add_argument("--image-size", type=int, default=None, help="default: each backbone's native size")
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    backend = use_backend(args.backend)

    from kbench.export import export_onnx

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; backend {backend}")
    print("| backbone | image size | build s | export s | ONNX MB | max relative difference |")
    print("|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.backbones.split(","):
            spec = get_backbone(name)
            size = args.image_size or spec.image_size
            start = time.perf_counter()
            model = build_classifier(spec, 2, size, "none")
            built = time.perf_counter() - start
            result = export_onnx(model, os.path.join(folder, f"{name}.onnx"))
            row = {"backbone": name, "image_size": size, "build_seconds": built, "backend": backend, **result}
            rows.append(row)
            print(
                f"| {name} | {size} | {built:.1f} | {result['export_seconds']:.1f} | {result['megabytes']:.1f} "
                f"| {result['max_relative_difference']:.1e} |",
                flush=True,
            )
            os.remove(result["path"])
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
