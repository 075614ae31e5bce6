"""``kbench compare``: a study's report (tables, plots, Pareto front) for runs and ensembles trained
outside a study, from what their folders hold. Nothing is trained, exported or timed again.

Each run folder gives its ``metrics.json`` (training time, log loss), ``history.csv`` (curves) and,
when a study timed it, ``latency.json``; all are read through ``kbench.training.runs.Run``.
"""

from __future__ import annotations

import logging
import os

from kbench.core import files
from kbench.core.errors import KbenchError
from kbench.core.tables import distinct_names
from kbench.report.report import report_in, write_report
from kbench.training.runs import Run, ensure_writable_folder

log = logging.getLogger("kbench")

DEFAULT_OUT = os.path.join("reports", "compare")
KIND = "comparison"  # results.json's kind: what compare may overwrite


def compare_runs(paths: list[str], out_dir: str = DEFAULT_OUT, command: str = "") -> dict:
    """Write report.md, results.csv/json, latency.csv and the plots comparing the finished runs
    and ensembles at ``paths`` into ``out_dir``; returns the results (the study's shape).

    Every path is checked before anything is written: a folder that isn't a finished run, the same
    run twice, or an ``out_dir`` that holds a run or a study's report is a KbenchError.

    >>> compare_runs(["runs/b0", "runs/b3", "runs/b0+b3"], "reports/mine")  # doctest: +SKIP
    """
    if not paths:
        raise KbenchError("name at least one run or ensemble folder to compare")
    runs = [Run.open(path) for path in paths]
    seen: dict[str, str] = {}
    for run in runs:
        real = os.path.realpath(run.path)
        if real in seen:
            raise KbenchError(f"{run.path} is given twice (as {seen[real]})")
        seen[real] = run.path
    _check_out(out_dir, seen)
    _warn_if_validated_apart(runs)
    names = distinct_names([run.name for run in runs], [run.path for run in runs])  # runs/a/m, runs/b/m
    rows = [_row(run, name, out_dir) for run, name in zip(runs, names)]
    results = {
        "kind": KIND,
        "name": f"{len(rows)} run(s)",
        "command": command,
        "backend": ", ".join(sorted({row["backend"] for row in rows if row.get("backend")})),
        "runs": [os.path.abspath(run.path) for run in runs],
        "rows": rows,
    }
    write_report(results, out_dir)
    return results


def _validated_on(run: Run) -> tuple:
    split = run.split
    return split.get("content_fingerprint") or split.get("fingerprint"), split.get("val")


def _warn_if_validated_apart(runs: list[Run]) -> None:
    """Log losses measured on other images don't rank models: say so (the report is still written)."""
    first = _validated_on(runs[0])
    for run in runs[1:]:
        if _validated_on(run) != first:
            log.warning(
                "%s and %s were validated on different images (other data or split): their log losses don't compare",
                runs[0].path,
                run.path,
            )
            return


def _check_out(out_dir: str, runs: dict[str, str]) -> None:
    for run_real, path in runs.items():
        if files.within(out_dir, run_real):
            raise KbenchError(f"--out {out_dir} is inside the run folder {path}; choose another --out")
    ensure_writable_folder(out_dir, "--out")
    found = report_in(out_dir)
    if found is not None and found.get("kind") != KIND:
        raise KbenchError(
            f"--out {out_dir} holds a study's report, which compare would overwrite; choose another --out"
        )


def _row(run: Run, name: str, out_dir: str) -> dict:
    """One results row, as a study writes it: the run's metrics, its timings, its folder."""
    metrics = dict(run.metrics or {})
    kind = run.kind
    backbone = metrics.get("backbone")
    if kind == "ensemble":
        backbone = "+".join(metrics.get("backbones") or [m.get("backbone", "?") for m in metrics.get("members", [])])
    return {
        **metrics,
        "name": name,
        "kind": kind,
        "backbone": backbone,
        "status": "ok",
        "latency": run.latency,
        "folder": os.path.relpath(os.path.abspath(run.path), os.path.abspath(out_dir)),
    }
