"""What every benchmark script keeps beside the table it prints: the raw rows as JSON, with the exact
command, the machine and its load, written atomically (``kbench.core.files.write_json``).

    parser = argparse.ArgumentParser()
    record.add_json_option(parser, "pipeline")  # --json PATH, default benchmarks/results/pipeline/pipeline.json
    args = parser.parse_args(argv)
    began = record.Record(__file__, argv)       # before measuring: the start time and load
    ...
    began.write(args.json, rows, table)         # after: rows + the markdown table printed

benchmarks/README.md quotes ``command`` and the JSON's path under each table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")


# benchmarks/results/ holds one folder per page of benchmarks/docs/: a script's results go to its page's
PAGES = {
    "backbones": "backbones",
    "cpu_backends": "cpu-backends",
    "ensemble_head": "ensemble-head",
    "export_all": "export",
    "export_graph": "export-graph",
    "pass_ablation": "export-graph",
    "latency_check": "latency",
    "openvino": "openvino",
    "pipeline": "pipeline",
    "ray_cluster": "ray",
    "recipe": "recipe",
}


def default_json(script: str) -> str:
    """benchmarks/results/PAGE/SCRIPT.json: beside the other results of the page that shows them."""
    return os.path.join(RESULTS_DIR, PAGES[script], f"{script}.json")


def add_json_option(parser, script: str) -> None:
    parser.add_argument(
        "--json",
        default=default_json(script),
        metavar="PATH",
        help=f"write the raw results here as JSON (default: {os.path.relpath(default_json(script), REPO)})",
    )


def positive_int(text: str) -> int:
    """argparse type for counts (runs, repeats, images, sizes): 0 would time nothing and a median of
    nothing is NaN, printed as a result with exit 0.

    >>> positive_int("3")
    3
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type for a comma-separated list of counts, e.g. batch sizes ``1,32``."""
    return [positive_int(part) for part in text.split(",")]


def positive_ints_text(text: str) -> str:
    """``positive_ints`` for options handed on to a child process as text: the same text, checked."""
    return ",".join(map(str, positive_ints(text)))


def add_backbone_timing_options(parser, repeats: int, big_runs: int) -> None:
    """The options of the scripts that time exported backbones interleaved (export_graph, pass_ablation):
    --backend, --backbones, --image-size, --batch-sizes, --repeats, --runs, --big-runs."""
    from kbench.models.backbones import REGISTRY

    parser.add_argument(
        "--backend",
        default=None,
        help="jax or tensorflow (default: KERAS_BACKEND, else the machine's: tensorflow without a GPU)",
    )
    parser.add_argument(
        "--backbones",
        default=",".join(name for name in REGISTRY if name != "small_cnn"),
        help="comma-separated registry names (default: every registered backbone but small_cnn)",
    )
    parser.add_argument("--image-size", type=positive_int, default=None, help="default: each backbone's native size")
    parser.add_argument("--batch-sizes", type=positive_ints, default=[1, 32], help="comma-separated (default: 1,32)")
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=repeats,
        help=f"interleaved rounds per batch size, an even number (odd: rounded up; default: {repeats})",
    )
    parser.add_argument(
        "--runs", type=positive_int, default=10, help="timed runs of each variant per round (default: 10)"
    )
    parser.add_argument(
        "--big-runs",
        type=positive_int,
        default=big_runs,
        help=f"--runs at batch >= 8 for backbones above 260 px (default: {big_runs})",
    )


def check_backbones(parser, names: list[str]) -> None:
    """Every backbone name known before anything is measured; otherwise kbench's message (with its
    guess and the valid names) as argparse's one error line, exit 2."""
    from kbench.core.errors import KbenchError
    from kbench.models.backbones import get_backbone

    try:
        for name in names:
            get_backbone(name)
    except KbenchError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


def even_repeats(args) -> None:
    """Round ``args.repeats`` up to an even number, saying so on stderr: ``interleaved_p50`` balances its
    order over each pair of rounds (an odd count puts one variant early once more than the others)."""
    if args.repeats % 2:
        print(
            f"--repeats {args.repeats} → {args.repeats + 1}: the order is balanced over pairs of rounds",
            file=sys.stderr,
        )
        args.repeats += 1


def child_result(command: list[str], label: str):
    """Run COMMAND (a benchmark script re-run with a hidden flag, so that one model's memory dies with
    its process) and return the JSON value on the last line of its output that starts with ``{`` or ``[``.
    A failure raises SystemExit in one line naming LABEL: the child's own ``{"error": ...}``, the signal
    that killed it, or the last line it wrote to stderr (``kbench.core.process.child_death``)."""
    from kbench.core.process import child_death, last_line

    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("{", "["))]
    value = json.loads(lines[-1]) if lines else None
    if isinstance(value, dict) and "error" in value:
        raise SystemExit(f"{label}: {value['error']}")
    failure = child_death(done.returncode, done.stderr, status=True)
    if failure is None and value is None:
        failure = f"its process exited 0: {last_line(done.stderr)}"
    if failure:
        raise SystemExit(f"{label}: {failure}")
    return value


def _load() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def command_line(script_file: str, argv: list[str] | None = None) -> str:
    """The command as typed at the repository's root: ``python benchmarks/NAME.py ARGS``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return "python " + shlex.join([os.path.relpath(os.path.abspath(script_file), REPO), *argv])


class Record:
    """The command line and the machine's state when a benchmark started; ``write`` adds the rows."""

    def __init__(self, script_file: str, argv: list[str] | None = None):
        self.command = command_line(script_file, argv)
        self.started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.load_at_start = _load()
        self._clock = time.perf_counter()

    def write(self, path: str, rows: list[dict], table: str, **extra) -> dict:
        """Write {command, started, seconds, machine, load averages, **extra, rows, table} to ``path``."""
        from kbench.core.files import write_json
        from kbench.core.machine import facts

        record = {
            "command": self.command,
            "started": self.started,
            "seconds": round(time.perf_counter() - self._clock, 1),
            "machine": facts(),
            "load_average_at_start": self.load_at_start,  # 1, 5, 15 minutes: other work on the machine
            "load_average_at_end": _load(),
            **extra,
            "rows": rows,
            "table": table,
        }
        write_json(path, record)
        return record
