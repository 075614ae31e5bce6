"""Export every registered backbone (as a binary classifier at its native size, seeded random weights)
to ONNX through ``kbench.export.onnx.export_onnx`` and record the time and the parity with Keras.

    python benchmarks/export_all.py [--backend tensorflow] [--backbones a,b] [--image-size N]
        [--json benchmarks/results/export/export_all.json]

Prints one markdown row per backbone as it goes, and writes the rows as JSON at the end. Weights come
from ``--seed`` and the parity check's pixels from ``kbench.export.onnx.PARITY_SEED``, so the "largest
relative difference" of a backbone repeats from run to run on one machine. Tiny mode, for tests:
--backbones small_cnn --image-size 32.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import record  # noqa: E402
from kbench.core.backend import use_backend  # noqa: E402
from kbench.models.backbones import REGISTRY, build_classifier, get_backbone  # noqa: E402
from kbench.models.settle import settle_random_weights  # noqa: E402

HEADER = (
    "| backbone | image size | build s | export s (incl. check) | ONNX MB | largest relative difference |\n"
    "|---|---|---|---|---|---|"
)


def table_line(row: dict) -> str:
    return (
        f"| {row['backbone']} | {row['image_size']} | {row['build_seconds']:.1f} | {row['export_seconds']:.1f} "
        f"| {row['megabytes']:.1f} | {row['max_relative_difference']:.1e} |"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None)
    parser.add_argument("--backbones", default=",".join(REGISTRY))
    parser.add_argument(
        "--image-size", type=record.positive_int, default=None, help="default: each backbone's native size"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    record.add_json_option(parser, "export_all")
    args = parser.parse_args(argv)
    began = record.Record(__file__, argv)
    backend = use_backend(args.backend)

    import keras

    from kbench.export.onnx import PARITY_SEED, export_onnx

    print(f"backend {backend}")
    print(HEADER, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.backbones.split(","):
            spec = get_backbone(name)
            size = args.image_size or spec.image_size
            keras.utils.set_random_seed(args.seed)  # the same weights every run: parity figures repeat
            start = time.perf_counter()
            model = build_classifier(spec, 2, size, "none")
            settle_random_weights(model)  # random weights made numerically tame: see its docstring
            built = time.perf_counter() - start
            result = export_onnx(model, os.path.join(folder, f"{name}.onnx"))
            os.remove(result.pop("path"))
            rows.append({"backbone": name, "image_size": size, "build_seconds": built, **result})
            print(table_line(rows[-1]), flush=True)
            del model
            keras.backend.clear_session()
    table = "\n".join([HEADER, *map(table_line, rows)])
    return began.write(args.json, rows, table, backend=backend, weights_seed=args.seed, parity_seed=PARITY_SEED)


if __name__ == "__main__":
    main()
