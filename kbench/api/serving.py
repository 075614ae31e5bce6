"""What a model costs to serve and what it predicts: ``latency``, ``predict``, ``score``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from kbench.api.common import (
    Run,
    _check_types,
    _file,
    _is_keras_model,
    _listed,
    _path,
    check_image_model,
    use_backend_if_unset,
)
from kbench.core.errors import KbenchError

Progress = Callable[[int, int], None]
LATENCY_FORMATS = ("table", "markdown", "csv", "json")  # kbench latency --format


def latency(
    models: Sequence[Any] | Any,
    *,
    runtimes: Sequence[str] | str | None = None,
    batch_sizes: Sequence[int] | int | None = None,
    runs: int | None = None,
    warmup: int | None = None,
    threads: int | None = None,
    weights: str | None = None,
    tune: bool | None = None,
    output: str | None = None,
    output_format: str = "json",
    progress: Progress | None = None,
) -> list[dict]:
    """Time inference of ``models`` (run folders, ``Run``s, ``.keras`` / ``.onnx`` files, backbone
    names, or in-memory ``keras.Model``s with one image input) on each runtime and batch size; one
    dict per model x runtime x batch size, the rows of ``kbench latency --format json``. Defaults are
    ``kbench latency``'s (every runtime this machine has, batch sizes 1, 8, 32, 100 runs).
    KeyboardInterrupt returns the rows finished so far, with ``rows.interrupted`` set.

    >>> rows = kbench.latency(["runs/b0", "exports/ens.onnx"], batch_sizes=[1, 32])  # doctest: +SKIP
    >>> import pandas; pandas.DataFrame(rows)  # doctest: +SKIP
    """
    from kbench.core import files
    from kbench.serving.latency import LatencyConfig, measure

    if isinstance(models, (str, os.PathLike, Run)) or _is_keras_model(models):
        models = [models]
    if not isinstance(models, Sequence) or not models:
        raise KbenchError("models must be a model or a non-empty list of models (paths, Runs, backbone names)")
    _refuse_repeats(models)
    if output_format not in LATENCY_FORMATS:
        raise KbenchError(f"output_format must be one of {', '.join(LATENCY_FORMATS)}; got {output_format!r}")
    output = _file(output, "output", optional=True)
    if output:
        from kbench.training.runs import refuse_overwriting

        refuse_overwriting(output, "-o", [model for model in models if isinstance(model, (str, os.PathLike))])
    defaults = LatencyConfig(models=[])
    with files.scratch_folder("latency-models") as scratch:
        paths = [_model_file(model, scratch, number) for number, model in enumerate(models)]
        config = LatencyConfig(
            paths,
            _listed(runtimes, defaults.runtimes, str),
            _listed(batch_sizes, defaults.batch_sizes, int),
            defaults.runs if runs is None else runs,
            defaults.warmup if warmup is None else warmup,
            threads,
            weights or defaults.weights,
            defaults.tune if tune is None else tune,
        )
        rows, interrupted = measure(config, output, output_format, progress=progress)
    return LatencyRows(rows, interrupted)


def _refuse_repeats(models: Sequence) -> None:
    """The same model named twice (``runs/a``, ``runs/a/`` and ``runs/a/model.keras``; one keras.Model
    object) would be timed twice, under one label: KbenchError naming the repeat."""
    from kbench.training.runs import Run as Folder

    seen: dict = {}
    for model in models:
        if _is_keras_model(model):
            key, shown = id(model), f"model {model.name!r}"
        else:
            shown = _path(model)
            key = os.path.realpath(shown) if os.path.exists(shown) else shown  # a backbone name: itself
            if os.path.isdir(shown) and os.path.isfile(Folder(shown).model_path):
                key = os.path.realpath(Folder(shown).model_path)
        if key in seen:
            again = "" if seen[key] == shown else f" (as {seen[key]})"
            raise KbenchError(f"{shown} is given twice{again}; each model is timed once: drop the repeat")
        seen[key] = shown


class LatencyRows(list):
    """The rows of ``latency``: a plain list of dicts, with ``interrupted`` set when Ctrl-C ended it."""

    def __init__(self, rows, interrupted: bool = False):
        super().__init__(rows)
        self.interrupted = interrupted


def _model_file(model, scratch: str, number: int) -> str:
    """A path for ``model``: an in-memory keras.Model is saved (as ``<name>.keras``) into ``scratch``."""
    if not _is_keras_model(model):
        return _path(model)
    use_backend_if_unset()
    check_image_model(model)
    folder = os.path.join(scratch, str(number))
    os.makedirs(folder)
    path = os.path.join(folder, f"{model.name}.keras")
    model.save(path)
    return path


def predict(
    model,
    data: str,
    output: str = "submission.csv",
    *,
    tta: str | None = None,
    clip: float | None = None,
    batch_size: int | None = None,
    runtime: str = "keras",
    calibrate: bool = False,
    progress: Progress | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """Predict a test set (a folder of images, or Kaggle's test.zip) into a Kaggle submission CSV
    (``id,label``, label = P(second class)); returns what ``kbench predict`` reports (path, rows, the
    model, TTA, clip, runtime, temperature). ``model``: a run or ensemble folder, ``Run``, ``.keras``
    or ``.onnx`` file.

    >>> kbench.predict("runs/ens", data="test.zip", output="submission.csv", tta="flip")  # doctest: +SKIP
    """
    from kbench.serving.submission import SubmissionConfig, predict_command

    defaults = SubmissionConfig()
    given = {"tta": tta, "clip": clip, "batch_size": batch_size}
    _check_types({name: value for name, value in given.items() if value is not None}, SubmissionConfig)
    settings = SubmissionConfig(
        tta or defaults.tta,
        defaults.clip if clip is None else clip,
        defaults.batch_size if batch_size is None else batch_size,  # 0 is refused, not the default
    )
    from kbench.training.runs import refuse_overwriting

    model, data, output = _path(model), _file(data, "data"), _file(output, "output")
    refuse_overwriting(output, "-o", [data, model])
    use_backend_if_unset()
    return predict_command(
        model,
        data,
        output,
        settings,
        runtime,
        calibrate,
        echo=echo or (lambda line: None),
        progress=progress,
    )


def score(submission: str, answers: str) -> dict:
    """Score a submission as Kaggle does, after a grader's checks: ``{"log_loss", "accuracy", "rows"}``.

    >>> kbench.score("submission.csv", answers="answers.csv")["log_loss"]  # doctest: +SKIP
    """
    from kbench.serving.submission import score_submission

    return score_submission(_file(submission, "submission"), _file(answers, "answers"))
