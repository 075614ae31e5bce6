"""What one pass of kbench's graph clean-up (``kbench.export.graph.PASSES``) is worth on its own: each backbone's
ONNX file cleaned with every pass ("all") and with every pass but ``--without`` ("without"), both
checked against Keras and timed by ONNX Runtime, interleaved.

``--without`` is a comma-separated list of variants, all timed interleaved against "all" in one
process: a pass name, several joined by ``+`` (left out together), or ``all`` (every pass left out:
onnxslim alone, then ONNX Runtime's own optimiser, as every session here runs at full optimisation).
One row per variant and batch size.

    python benchmarks/pass_ablation.py --without read_input_channels_last [--backend tensorflow]
        [--backbones a,b] [--batch-sizes 1,32] [--repeats 8] [--runs 10] [--big-runs 2] [--one-session] [--threads N]
        [--json benchmarks/results/export-graph/pass_ablation.json]

Models are the feature extractors (pooled features, so parity compares unsaturated values), with seeded
random weights settled by ``kbench.models.settle.settle_random_weights`` and ImageNet normalisation constants
(as ``export_graph.py``). Parity: largest |ONNX Runtime - Keras| over the largest |Keras| on three
seeded images. Timing as ``export_graph.py``: ``--repeats`` rounds, each running both variants ``--runs``
times (``--big-runs`` at batch >= 8), in pairs of rounds (an order, then its reverse), p50 = the median
of all; ``--one-session`` as in ``export_graph.py`` (EfficientNet-B7's two sessions at batch 32 don't fit
in 24 GiB). Each backbone runs in a process of its own (TensorFlow's conversions keep memory between
models). Tiny mode, for tests:
--backbones small_cnn --image-size 32 --batch-sizes 1 --repeats 2 --runs 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import record  # noqa: E402

EVERY_PASS = "every pass"  # the baseline variant: nothing left out (a pass name has no space)

HEADER = (
    "| backbone | px | batch | without | rewrites | parity all / without | all ms | without ms | all / without |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def table_line(row: dict) -> str:
    return (
        f"| {row['backbone']} | {row['image_size']} | {row['batch_size']} | {row['without']} | {row['rewrites']} "
        f"| {row['parity_all']:.1e} / {row['parity_without']:.1e} | {row['p50_ms_all']:.2f} "
        f"| {row['p50_ms_without']:.2f} | {row['all_over_without']:.3f} |"
    )


def measure_backbone(name: str, args) -> list[dict]:
    """One backbone, in this process: export, clean both ways, check, time."""
    import keras
    import onnx

    from benchmarks import export_graph
    from kbench.export import graph
    from kbench.export.onnx import export_onnx
    from kbench.models.backbones import build_feature_extractor, get_backbone
    from kbench.models.settle import settle_random_weights

    spec = get_backbone(name)
    size = args.image_size or spec.image_size
    keras.utils.set_random_seed(0)
    model = build_feature_extractor(spec, size, "none")
    export_graph.imagenet_normalization(model)
    settle_random_weights(model)
    pixels = np.random.default_rng(5).uniform(0, 255, (3, size, size, 3)).astype(np.float32)
    expected = np.asarray(model.predict_on_batch(pixels), np.float64)
    with tempfile.TemporaryDirectory() as folder:
        converted = os.path.join(folder, "converted.onnx")
        export_onnx(model, converted, graph_passes=False)
        del model
        keras.backend.clear_session()
        paths, rewrites = {}, {}
        for index, variant in enumerate([EVERY_PASS, *args.without]):
            left_out = left_out_passes(variant)
            kept = {key: value for key, value in graph.PASSES.items() if key not in left_out}
            saved = dict(graph.PASSES)
            graph.PASSES.clear()
            graph.PASSES.update(kept)
            try:
                cleaned, done = graph.clean_graph(onnx.load(converted))
            finally:
                graph.PASSES.clear()
                graph.PASSES.update(saved)
            if variant == EVERY_PASS:
                rewrites = {name: sum(done.get(one, 0) for one in left_out_passes(name)) for name in args.without}
            paths[variant] = os.path.join(folder, f"variant{index}.onnx")
            onnx.save(cleaned, paths[variant])
        parity = {}
        settings = {**export_graph.FIXED_SETTINGS, "threads": args.threads} if args.threads else None
        for variant, path in paths.items():  # one session at a time
            current = export_graph.session(path, settings)
            got = current.run(None, {current.get_inputs()[0].name: pixels})[0]
            parity[variant] = float(np.max(np.abs(got - expected)) / max(float(np.max(np.abs(expected))), 1e-30))
            del current
        if args.one_session:
            sessions = {variant: (path, settings) for variant, path in paths.items()}
        else:
            sessions = {variant: export_graph.session(path, settings) for variant, path in paths.items()}
        rows = []
        for batch in args.batch_sizes:
            rng = np.random.default_rng(0)
            feeds = {variant: export_graph.feed_for(current, batch, rng) for variant, current in sessions.items()}
            runs = args.big_runs if batch >= 8 else args.runs
            p50 = export_graph.interleaved_p50(sessions, feeds, args.repeats, runs)
            for variant in args.without:
                rows.append(
                    {
                        "backbone": name,
                        "image_size": size,
                        "batch_size": batch,
                        "without": variant,
                        "rewrites": rewrites[variant],
                        "repeats": args.repeats,
                        "runs_per_repeat": runs,
                        "parity_all": parity[EVERY_PASS],
                        "parity_without": parity[variant],
                        "p50_ms_all": p50[EVERY_PASS],
                        "p50_ms_without": p50[variant],
                        "all_over_without": p50[EVERY_PASS] / p50[variant],
                    }
                )
    return rows


def left_out_passes(variant: str) -> list[str]:
    """The passes a ``--without`` variant leaves out: ``all`` every one, ``a+b`` both, ``EVERY_PASS`` none."""
    from kbench.export.graph import PASSES

    if variant == EVERY_PASS:
        return []
    return list(PASSES) if variant == "all" else [name for name in variant.split("+") if name]


def without_variants(text: str) -> list[str]:
    """argparse type for ``--without``: comma-separated variants, each ``all`` or pass names joined by ``+``."""
    from kbench.export.graph import PASSES

    variants = [part for part in text.split(",") if part]
    for variant in variants:
        unknown = [name for name in variant.split("+") if name not in PASSES] if variant != "all" else []
        if unknown:
            raise argparse.ArgumentTypeError(f"no pass {unknown[0]!r}; the passes: all, {', '.join(PASSES)}")
    if not variants or len(set(variants)) != len(variants):
        raise argparse.ArgumentTypeError(f"variants named once each, at least one: {text!r}")
    return variants


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--without",
        required=True,
        type=without_variants,
        help="the passes left out, comma-separated variants: a pass, passes joined by +, or all (onnxslim alone)",
    )
    record.add_backbone_timing_options(parser, repeats=8, big_runs=2)
    parser.add_argument(
        "--one-session",
        action="store_true",
        help="open each variant's session for its turn only (one in memory at a time: big models, big batches)",
    )
    parser.add_argument(
        "--threads",
        type=record.positive_int,
        default=None,
        help="ONNX Runtime's intra-op threads (default: kbench's, one per physical core); 1 on a shared machine "
        "keeps another process on the other core from stretching every run",
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the per-backbone child
    record.add_json_option(parser, "pass_ablation")
    args = parser.parse_args(argv)
    record.even_repeats(args)
    if args.one:
        from kbench.core.backend import use_backend

        use_backend(args.backend)
        print(json.dumps(measure_backbone(args.backbones, args)), flush=True)
        return {}
    record.check_backbones(parser, args.backbones.split(","))
    began = record.Record(__file__, argv)
    print(HEADER, flush=True)
    rows = []
    for name in args.backbones.split(","):
        child = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])]
        index = child.index("--backbones") if "--backbones" in child else None
        if index is not None:
            child[index + 1] = name
        else:
            child += ["--backbones", name]
        for row in record.child_result([*child, "--one"], name):
            rows.append(row)
            print(table_line(row), flush=True)
        began.write(args.json, rows, "(partial)", without=args.without, settings=vars(args))
    table = "\n".join([HEADER, *map(table_line, rows)])
    return began.write(args.json, rows, table, without=args.without, settings=vars(args))


if __name__ == "__main__":
    main()
