"""What kbench's graph clean-up (``kbench.export.graph``) does to each backbone's ONNX file: node counts by type
and ONNX Runtime latency before and after, against timm's export of the same architecture when the
peer environment exists (``make peer-env``), and (``--session-options``) which ONNX Runtime session
options are fastest on this CPU.

    python benchmarks/export_graph.py [--backend tensorflow] [--backbones a,b] [--image-size N]
        [--batch-sizes 1,32] [--repeats 6] [--runs 10] [--big-runs 3] [--session-options]
        [--counts-only] [--one-session] [--json benchmarks/results/export-graph/export_graph.json]

``--counts-only``: node counts before and after, the passes' record and parity, no timing and no peer
(structure barely depends on the image size, so every backbone can be checked at a small one).
``--one-session``: each variant's ONNX Runtime session is opened for its turn in a round and closed after
it, so one session at a time holds memory (three sessions of a big model at batch 32 don't fit in 24 GiB).
The JSON is rewritten after each backbone, so a run that is stopped keeps the rows it finished. Each
backbone is built and exported in a process of its own (conversion's memory is not the timing's).

Every model is the binary classifier kbench exports, with seeded random weights (settled by
``kbench.models.settle.settle_random_weights``: tame batch-norm statistics, an unsaturated head) and ImageNet
normalisation constants (as ``weights="imagenet"`` has them; with random weights Keras leaves them at
mean 0, variance 1, which would hide the preprocessing's cost). "before" is the file as converted,
"after" the file ``kbench export`` writes. The variants of a backbone are timed interleaved: each of
``--repeats`` rounds runs every variant ``--runs`` times (``--big-runs`` at batch >= 8 for backbones
whose native size is above 260 px), the rounds in pairs: an order, then the same order reversed,
rotated from pair to pair (an odd ``--repeats`` is rounded up); the p50 is the median of all of them.
Sessions use kbench's onnxruntime-cpu settings (``kbench.serving.onnx_runtime.OnnxRuntimeCPU``) with
spinning off. timm's model takes NCHW pixels and has one output unit too; its weights are random as
well. Tiny mode, for tests: --backbones small_cnn --image-size 32 --batch-sizes 1 --repeats 2 --runs 2.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import record  # noqa: E402
from kbench.core.backend import use_backend  # noqa: E402
from kbench.core.errors import first_line  # noqa: E402
from kbench.core.process import child_death  # noqa: E402
from kbench.models.backbones import build_classifier, get_backbone  # noqa: E402
from kbench.models.settle import settle_random_weights  # noqa: E402
from kbench.serving.onnx_runtime import FIXED_CPU_SETTINGS, CpuSettings, OnnxRuntimeCPU, onnx_session  # noqa: E402

PEER_PYTHON = os.path.join(record.REPO, ".venv-peer", "bin", "python")
PEER_SCRIPT = os.path.join(record.REPO, "benchmarks", "peer_timm.py")
TIMM_NAMES = {
    "mobilenet_v2": "mobilenetv2_100",
    "inception_v3": "inception_v3",
    "xception": "legacy_xception",
    **{f"efficientnet_b{i}": f"efficientnet_b{i}" for i in range(8)},
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_VARIANCE = [0.229**2, 0.224**2, 0.225**2]
NOT_AVAILABLE = "not available"
WATCHED = ("Pad", "Squeeze", "Reshape", "Transpose")


def imagenet_normalization(model) -> int:
    """Give every 3-channel Normalization layer ImageNet's mean and variance; returns how many."""
    from keras import layers

    changed = 0
    for layer in model._flatten_layers(include_self=False):
        adapted = getattr(layer, "adapt_mean", None)
        if isinstance(layer, layers.Normalization) and adapted is not None and tuple(adapted.shape) == (3,):
            layer.adapt_mean.assign(np.array(IMAGENET_MEAN, np.float32))
            layer.adapt_variance.assign(np.array(IMAGENET_VARIANCE, np.float32))
            layer.finalize_state()
            changed += 1
    return changed


def node_counts(path: str) -> dict[str, int]:
    import onnx

    return dict(collections.Counter(node.op_type for node in onnx.load(path).graph.node))


def peer_export(backbone: str, image_size: int, output: str) -> str | None:
    """timm's ONNX file of the same architecture through the peer interpreter; None when there is no
    peer environment or no timm counterpart."""
    name = TIMM_NAMES.get(backbone)
    if name is None or not os.path.isfile(PEER_PYTHON):
        return None
    done = subprocess.run([PEER_PYTHON, PEER_SCRIPT, name, str(image_size), output], capture_output=True, text=True)
    failure = child_death(done.returncode, done.stderr, silent=str(done.returncode))
    if failure:
        raise RuntimeError(f"timm export of {name} failed: {failure}")
    return output


# The settings every variant is timed with, unless --session-options says otherwise: kbench's
# onnxruntime-cpu with spinning off (its shared-machine candidate; ``kbench latency`` measures which of
# its two candidates to use, which a comparison of graphs must not do per variant).
FIXED_SETTINGS = {"settings": replace(FIXED_CPU_SETTINGS, spinning=False)}


def session(path: str, settings: dict | None = None):
    """A session with OnnxRuntimeCPU's options for ``settings`` (its keywords: threads, settings)."""
    runtime = OnnxRuntimeCPU(**(FIXED_SETTINGS if settings is None else settings))
    return onnx_session(path, ["CPUExecutionProvider"], runtime.options())


def interleaved_p50(sessions: dict, feeds: dict, repeats: int, runs: int) -> dict[str, float]:
    """Median milliseconds per variant: ``repeats`` rounds, each running every variant ``runs`` times
    (one untimed warm-up call first), by ``kbench.core.timing.interleaved``. Rounds come in pairs: an order,
    then the same order reversed, the order rotated by one from pair to pair. In every pair each variant's
    mean position is the same, so a linear drift across a pair (the machine warming, another process
    starting) reaches all variants alike; ``record.even_repeats`` makes the count even.
    A variant given as a file path, or a (path, settings) pair, instead of a session is opened for its
    turn and closed after it, so that one session at a time holds memory (``--one-session``: big models at
    big batches); its warm-up call then also pays for that session's first allocations, outside the
    timings."""
    from kbench.core import timing

    calls = {name: (name, current) for name, current in sessions.items()}

    def open_block(variant):
        name, current = variant
        if _unopened(current):
            current = session(*current) if isinstance(current, tuple) else session(current)
        return lambda: current.run(None, feeds[name])

    opened = not any(_unopened(current) for current in sessions.values())
    timings = timing.interleaved(calls, repeats, runs, warmup=1 if opened else 0, open_block=open_block)
    return timing.medians(timings)


def _unopened(variant) -> bool:
    return isinstance(variant, (str, tuple))


def feed_for(current, batch: int, rng) -> dict:
    """Seeded pixels at ``batch`` for a session, or for an ONNX file (a path or a (path, settings) pair)
    without opening one."""
    if _unopened(current):
        import onnx

        path = current[0] if isinstance(current, tuple) else current
        value = onnx.load(path, load_external_data=False).graph.input[0]
        dims = [dim.dim_value for dim in value.type.tensor_type.shape.dim]
        return {value.name: rng.uniform(0, 255, [batch, *dims[1:]]).astype(np.float32)}
    value = current.get_inputs()[0]
    shape = [batch, *[int(d) for d in value.shape[1:]]]
    return {value.name: rng.uniform(0, 255, shape).astype(np.float32)}


def _counts_text(counts: dict) -> str:
    return ", ".join(f"{op} {counts.get(op, 0)}" for op in WATCHED)


def _ratio(top, bottom):
    return top / bottom if isinstance(top, float) and isinstance(bottom, float) else NOT_AVAILABLE


def _cell(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


HEADER = (
    "| backbone | px | batch | nodes before → after (timm) | before | after | timm | after / before | after / timm |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def table_line(row: dict) -> str:
    nodes = f"{row['nodes_before']} → {row['nodes_after']} ({row['nodes_timm']})"
    return (
        f"| {row['backbone']} | {row['image_size']} | {row['batch_size']} | {nodes} | {_cell(row['p50_ms_before'])} "
        f"| {_cell(row['p50_ms_after'])} | {_cell(row['p50_ms_timm'])} | {_cell(row['after_over_before'])} "
        f"| {_cell(row['after_over_timm'])} |"
    )


COUNTS_HEADER = (
    "| backbone | px | nodes before → after | watched before | watched after | parity |\n|---|---|---|---|---|---|"
)


def counts_line(row: dict) -> str:
    return (
        f"| {row['backbone']} | {row['image_size']} | {row['nodes_before']} → {row['nodes_after']} "
        f"| {row['watched_before']} | {row['watched_after']} | {row['max_relative_difference']:.1e} |"
    )


def export_variants(name: str, size: int, folder: str) -> dict:
    """The "before" and "after" files of one backbone in ``folder`` (in the child process: see
    ``exported_in_child``); returns the "after" export's record."""
    import keras

    from kbench.export.onnx import export_onnx

    keras.utils.set_random_seed(0)
    model = build_classifier(get_backbone(name), 2, size, "none")
    imagenet_normalization(model)
    settle_random_weights(model)  # random weights made numerically tame: see its docstring
    export_onnx(model, os.path.join(folder, f"{name}-before.onnx"), graph_passes=False)
    return export_onnx(model, os.path.join(folder, f"{name}.onnx"))


def exported_in_child(name: str, size: int, folder: str, backend: str) -> dict:
    """``export_variants`` in a process of its own. tf2onnx's optimiser deep-copies the graph, and a
    converting process keeps much of what it reached: EfficientNet-B7 at 600 px peaked at 16.6 GB and
    kept 11.6 GB resident here (before ``kbench.export.onnx`` collected between those copies), which the
    timing, and the next backbone, would otherwise run beside."""
    child = [sys.executable, os.path.abspath(__file__), "--backend", backend, "--backbones", name]
    return record.child_result([*child, "--image-size", str(size), "--export-into", folder], name)


def measure_backbone(name: str, args, folder: str, backend: str) -> list[dict]:
    spec = get_backbone(name)
    size = args.image_size or spec.image_size
    exported = exported_in_child(name, size, folder, backend)
    paths = {"before": os.path.join(folder, f"{name}-before.onnx"), "after": os.path.join(folder, f"{name}.onnx")}
    if args.counts_only:
        counts = {variant: node_counts(path) for variant, path in paths.items()}
        for path in paths.values():
            os.remove(path)
        row = {
            "backbone": name,
            "image_size": size,
            "nodes_before": sum(counts["before"].values()),
            "nodes_after": sum(counts["after"].values()),
            "counts_before": counts["before"],
            "counts_after": counts["after"],
            "watched_before": _counts_text(counts["before"]),
            "watched_after": _counts_text(counts["after"]),
            "graph_passes": exported["graph_passes"],
            "max_relative_difference": exported["max_relative_difference"],
        }
        print(counts_line(row), flush=True)
        return [row]
    timm_path = peer_export(name, size, os.path.join(folder, f"{name}-timm.onnx"))
    if timm_path:
        paths["timm"] = timm_path
    counts = {variant: node_counts(path) for variant, path in paths.items()}
    sessions = dict(paths) if args.one_session else {variant: session(path) for variant, path in paths.items()}
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch_sizes:
        feeds = {variant: feed_for(current, batch, rng) for variant, current in sessions.items()}
        runs = args.big_runs if batch >= 8 and spec.image_size > 260 else args.runs
        p50 = interleaved_p50(sessions, feeds, args.repeats, runs)
        timm_p50 = p50.get("timm", NOT_AVAILABLE)
        rows.append(
            {
                "backbone": name,
                "image_size": size,
                "batch_size": batch,
                "repeats": args.repeats,
                "runs_per_repeat": runs,
                "one_session": args.one_session,
                "nodes_before": sum(counts["before"].values()),
                "nodes_after": sum(counts["after"].values()),
                "nodes_timm": sum(counts["timm"].values()) if "timm" in counts else NOT_AVAILABLE,
                "counts_before": counts["before"],
                "counts_after": counts["after"],
                "counts_timm": counts.get("timm", NOT_AVAILABLE),
                "watched_before": _counts_text(counts["before"]),
                "watched_after": _counts_text(counts["after"]),
                "graph_passes": exported["graph_passes"],
                "max_relative_difference": exported["max_relative_difference"],
                "p50_ms_before": p50["before"],
                "p50_ms_after": p50["after"],
                "p50_ms_timm": timm_p50,
                "after_over_before": p50["after"] / p50["before"],
                "after_over_timm": _ratio(p50["after"], timm_p50),
            }
        )
        print(table_line(rows[-1]), flush=True)
    return rows


# ONNX Runtime session options timed by --session-options, as kbench.serving.onnx_runtime.OnnxRuntimeCPU settings.
SESSION_VARIANTS = {
    "ORT defaults (threads 0)": {"threads": 0, "settings": CpuSettings()},
    "threads = physical cores": {"settings": CpuSettings()},
    "no spinning": {"settings": CpuSettings(spinning=False)},
    "denormals as zero": {"settings": CpuSettings(denormal_as_zero=True)},
    "NHWC layout transformer off": {"settings": CpuSettings(nhwc=False)},
    "kbench's settings, spinning off": FIXED_SETTINGS,
}
OPTION_HEADER = "| session options | batch | p50 ms | / ORT defaults |\n|---|---|---|---|"


def measure_session_options(path: str, args) -> list[dict]:
    if args.one_session:
        sessions = {label: (path, settings) for label, settings in SESSION_VARIANTS.items()}
    else:
        sessions = {label: session(path, settings) for label, settings in SESSION_VARIANTS.items()}
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch_sizes:
        feeds = {label: feed_for(current, batch, rng) for label, current in sessions.items()}
        p50 = interleaved_p50(sessions, feeds, args.repeats, args.runs)
        base = p50["ORT defaults (threads 0)"]
        for label, value in p50.items():
            rows.append({"session_options": label, "batch_size": batch, "p50_ms": value, "over_defaults": value / base})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    record.add_backbone_timing_options(parser, repeats=6, big_runs=3)
    parser.add_argument("--session-options", action="store_true", help="also time ONNX Runtime's session options")
    parser.add_argument("--counts-only", action="store_true", help="node counts and parity only: no timing, no peer")
    parser.add_argument(
        "--one-session",
        action="store_true",
        help="open each variant's session for its turn only (one in memory at a time: big models, big batches)",
    )
    record.add_json_option(parser, "export_graph")
    parser.add_argument("--export-into", help=argparse.SUPPRESS)  # the per-backbone child's folder
    args = parser.parse_args(argv)
    record.even_repeats(args)
    if args.export_into:
        use_backend(args.backend)
        size = args.image_size or get_backbone(args.backbones).image_size
        try:
            exported = export_variants(args.backbones, size, args.export_into)
        except Exception as error:  # the parent says which backbone, in one line
            exported = {"error": first_line(error, named=True)}
        print(json.dumps(exported), flush=True)
        return {}
    if args.counts_only and args.session_options:
        parser.error("--session-options times sessions, --counts-only times nothing: choose one")
    names = args.backbones.split(",")
    record.check_backbones(parser, names)
    began = record.Record(__file__, argv)
    backend = use_backend(args.backend)

    peer = "timm (" + PEER_PYTHON + ")" if os.path.isfile(PEER_PYTHON) else NOT_AVAILABLE + " (make peer-env)"
    print(f"backend {backend}; peer {peer}")
    print(COUNTS_HEADER if args.counts_only else HEADER, flush=True)
    rows, option_rows = [], []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            rows.extend(measure_backbone(name, args, folder, backend))
            began.write(args.json, rows, "(partial)", backend=backend, peer=peer, settings=vars(args))
        if args.session_options and not args.counts_only:
            option_rows = measure_session_options(os.path.join(folder, f"{names[0]}.onnx"), args)
    if args.counts_only:
        table = "\n".join([COUNTS_HEADER, *map(counts_line, rows)])
        return began.write(args.json, rows, table, backend=backend, settings=vars(args))
    table = "\n".join([HEADER, *map(table_line, rows)])
    first_rows = {}
    for row in rows:  # one line per backbone
        first_rows.setdefault(row["backbone"], row)
    counts = "\n".join(
        [
            "| backbone | nodes before | nodes after |",
            "|---|---|---|",
            *(f"| {name} | {row['watched_before']} | {row['watched_after']} |" for name, row in first_rows.items()),
        ]
    )
    table += "\n\n" + counts
    if option_rows:
        lines = [
            f"| {r['session_options']} | {r['batch_size']} | {r['p50_ms']:.2f} | {r['over_defaults']:.2f} |"
            for r in option_rows
        ]
        table += "\n\n" + "\n".join([OPTION_HEADER, *lines])
    print("\n" + table.split("\n\n", 1)[1])
    return began.write(
        args.json, rows, table, backend=backend, peer=peer, session_options=option_rows, settings=vars(args)
    )


if __name__ == "__main__":
    main()
