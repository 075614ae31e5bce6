"""The whole study: ``bench``, ``demo`` and ``compare`` return a ``Study``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kbench.api.common import (
    Run,
    _file,
    _path,
    _quiet,
    _verbose,
)


@dataclass(frozen=True)
class Study:
    """A finished (or partly failed) study: ``out`` (its folder), ``results`` (the rows of
    results.csv, one per model), ``report`` (report.md's path), ``failed`` (how many stages failed)
    and ``submission`` (what was submitted, if a test set was given)."""

    out: str
    results: list[dict]
    report: str
    failed: int
    submission: dict | None
    record: dict = dataclasses.field(repr=False, compare=False)

    def __repr__(self) -> str:
        ok = sum(row.get("status") == "ok" for row in self.results)
        failed = f", {self.failed} failed" if self.failed else ""
        return f"Study({self.out!r}: {ok} of {len(self.results)} models ok{failed}; report {self.report})"


def bench(
    config: str,
    data: str | None = None,
    test_data: str | None = None,
    answers: str | None = None,
    *,
    out: str | None = None,
    backend: str | None = None,
    layout: str | None = None,
    devices: str | None = None,
    mixed_precision: str | None = None,
    overwrite: bool = False,
    executor: str = "sequential",
    address: str | None = None,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
    command: str = "",
) -> Study:
    """Run (or resume) the whole study of ``config`` (a study TOML, or one kbench ships: "seed",
    "demo", "modern") into ``out`` (default ``reports/NAME``): train, export, time, ensemble, predict,
    report (``kbench bench``). Re-running resumes; a failed stage is marked in the results, not raised.

    >>> study = kbench.bench("seed", data="train.zip", test_data="test.zip")  # doctest: +SKIP
    >>> study.results, study.report  # doctest: +SKIP
    """
    from kbench.study.config import load_config
    from kbench.study.executors import ExecutorConfig
    from kbench.study.study import run_study

    _quiet()
    where = ExecutorConfig(executor, address).check()
    overrides = {
        "data": data,
        "test_data": test_data,
        "answers": answers,
        "backend": backend,
        "layout": layout,
        "devices": str(devices) if isinstance(devices, int) and not isinstance(devices, bool) else devices,
        "mixed_precision": mixed_precision,
    }
    overrides = {key: os.fspath(value) if isinstance(value, os.PathLike) else value for key, value in overrides.items()}
    study = load_config(
        _file(config, "config"), **{key: value for key, value in overrides.items() if value is not None}
    )
    out = _file(out, "out") if out is not None else os.path.join("reports", study.name)
    results = run_study(study, out, command, _verbose(not progress), echo or (lambda line: None), overwrite, where)
    return _study(results, out)


def _study(results: dict, out: str) -> Study:
    from kbench.core.tables import flat_rows
    from kbench.report.report import REPORT_MD

    return Study(
        out,
        flat_rows(results),
        os.path.join(out, REPORT_MD),
        int(results.get("failed", 0)),
        results.get("submission"),
        results,
    )


def demo(
    out: str = "reports/demo",
    *,
    images: int = 600,
    fresh: bool = False,
    backend: str | None = None,
    echo: Callable[[str], None] | None = None,
    command: str = "",
) -> Study:
    """The offline demo (``kbench demo``): generated Dogs-vs-Cats-style images, then the packaged
    ``demo`` study on them, into ``out``."""
    from kbench.study.study import run_demo

    results, out = run_demo(
        _file(out, "out"), images, fresh, backend, echo=echo or (lambda line: None), command=command
    )
    return _study(results, out)


def compare(runs: Sequence[str | Run], out: str = os.path.join("reports", "compare"), command: str = "") -> Study:
    """A study's report (tables, plots, Pareto front) for runs and ensembles trained outside a study
    (``kbench compare``); nothing is trained or timed again."""
    from kbench.report.compare import compare_runs

    if isinstance(runs, (str, os.PathLike, Run)):
        runs = [runs]
    out = _file(out, "out")
    results = compare_runs([_path(run) for run in runs], out, command=command)
    return _study(results, out)
