"""The whole comparison (``kbench bench``): train every listed backbone, export and time each, build
the ensembles, predict the test set with the best model, write the report. The study's TOML is
read by ``kbench.study.config``; the backbone entries run in turn or on Ray (``kbench.study.executors``);
each model's stages are ``kbench.study.stages``.

Resumable, keyed by configuration: a finished member is reused only when the settings and data it
recorded are the ones the TOML asks for now (otherwise it is trained again, with a warning); an
ensemble only when its members' models are the ones it was built from; ONNX files and timings
only when made from the same model bytes and options. One member failing doesn't stop the study:
it is retried once at half the batch size if it ran out of memory, else marked failed with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import signal

from kbench.core import files
from kbench.core.errors import STOP_REQUESTS, KbenchError, TrainingInterrupted, first_line
from kbench.core.process import stop_if_requested
from kbench.report.report import report_in
from kbench.study.config import StudyConfig, check_devices, load_config, packaged_config
from kbench.study.executors import ExecutorConfig, run_members
from kbench.study.stages import build_ensemble, measure, member_row, stop_if_requested_from, time_member
from kbench.training.runs import ensure_writable_folder, folder_lock

log = logging.getLogger("kbench")


def prepare_out(config: StudyConfig, out_dir: str, overwrite: bool = False) -> None:
    """Refuse an --out folder that holds something else: a run folder, or another study's results."""
    ensure_writable_folder(out_dir, "--out")
    found = report_in(out_dir)
    if found is not None and not overwrite:
        previous = found.get("name")
        if previous != config.name:
            raise KbenchError(
                f"--out {out_dir} holds the results of study {previous!r}, not {config.name!r}; "
                "choose another --out, or pass --overwrite"
            )
    if overwrite:
        for name in ("runs", "ensembles", "onnx"):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def run_study(
    config: StudyConfig,
    out_dir: str,
    command: str = "",
    verbose=0,
    echo=print,
    overwrite: bool = False,
    executor: ExecutorConfig | None = None,
) -> dict:
    """Run (or resume) the study into ``out_dir``; returns the results written to results.json.

    The backbone entries run in turn, or as Ray tasks with ``executor.executor == "ray"``
    (``kbench.study.executors``); ensembles and the submission follow in this process. Results carry
    ``failed``: the number of members, ensembles and stages that failed (the CLI's exit status 1
    when not zero)."""
    executor = (executor or ExecutorConfig()).check()
    from kbench.core.backend import use_backend
    from kbench.data.dataset import data_fingerprint, find_images

    config.backend = use_backend(config.backend)
    images = find_images(config.data, layout=config.layout)  # the layout is checked before any training
    fingerprint = data_fingerprint(images)  # content included: other pixels under the same names retrain
    if executor.executor != "ray":  # on Ray, against the cluster's nodes (executors.placement)
        check_devices(config)
    prepare_out(config, out_dir, overwrite)
    try:
        with folder_lock(out_dir, what="--out folder"):
            files.remove_stale_temporaries(out_dir)
            return _run_locked(config, out_dir, fingerprint, command, verbose, echo, executor)
    except (TrainingInterrupted, KeyboardInterrupt) as stopped:
        number = getattr(stopped, "signal_number", None) or (STOP_REQUESTS[0] if STOP_REQUESTS else signal.SIGINT)
        raise TrainingInterrupted("interrupted; run the same command again to resume the study", number) from None


def _run_locked(
    config: StudyConfig, out_dir: str, fingerprint: str, command: str, verbose, echo, executor: ExecutorConfig
) -> dict:
    runs_dir, ensembles_dir, onnx_dir = (os.path.join(out_dir, name) for name in ("runs", "ensembles", "onnx"))
    for folder in (runs_dir, ensembles_dir, onnx_dir):
        os.makedirs(folder, exist_ok=True)
    members = run_members(
        config.backbones,
        functools.partial(member_row, out_dir=out_dir, fingerprint=fingerprint, latency=config.latency),
        functools.partial(time_member, out_dir=out_dir, latency=config.latency),
        out_dir,
        config.backend,
        verbose,
        echo,
        executor,
    )
    done = {row["name"]: os.path.join(runs_dir, row["name"]) for row in members if row["status"] == "ok"}

    ensembles = []
    for entry in config.ensembles:
        row = {
            "name": entry.name,
            "kind": "ensemble",
            "backbone": "+".join(entry.members),
            "folder": os.path.relpath(os.path.join(ensembles_dir, entry.name), out_dir),
        }
        missing = [m for m in entry.members if m not in done]
        if missing:
            row["status"] = f"failed: member(s) {', '.join(missing)} failed"
        else:
            echo(f"ensemble {entry.name}: {entry.config.method} of {len(entry.members)}")
            model_dir = os.path.join(ensembles_dir, entry.name)
            ensemble_config = dataclasses.replace(
                entry.config,
                members=[os.path.abspath(done[m]) for m in entry.members],  # however --out was spelled
                run_dir=model_dir,
                backend=config.backend,
            )

            def fit(ensemble_config=ensemble_config, backbone=row["backbone"]):
                return {**build_ensemble(ensemble_config, fingerprint, verbose), "backbone": backbone}

            if measure(row, fit, model_dir, onnx_dir, config.latency):
                done[entry.name] = model_dir
        ensembles.append(row)

    rows = members + ensembles
    results = {"name": config.name, "command": command, "backend": config.backend, "rows": rows}
    finished = [row for row in rows if row["status"] == "ok" and row.get("val_log_loss") is not None]
    if finished and config.test_data:
        best = min(finished, key=lambda row: row["val_log_loss"])
        try:
            stop_if_requested()
            results["submission"] = _submit(config, done[best["name"]], best["name"], out_dir)
            echo(f"submission from {best['name']}: {results['submission']['path']}")
        except (TrainingInterrupted, KeyboardInterrupt):
            raise
        except Exception as error:  # the report is still written, with the failure in it
            stop_if_requested_from(error)
            results["submission"] = {"model": best["name"], "status": f"failed: {first_line(error, named=True)}"}
            log.warning("submission %s", results["submission"]["status"])
    results["failed"] = sum(row["status"] != "ok" for row in rows) + int(
        results.get("submission", {}).get("status", "ok") != "ok"
    )
    from kbench.core.machine import facts
    from kbench.report.report import write_report

    results["machine"] = facts(config.latency.threads)
    stop_if_requested()
    write_report(results, out_dir)
    return results


def _submit(config: StudyConfig, model_dir: str, name: str, out_dir: str) -> dict:
    from kbench.serving.submission import predict_test_set, score_submission

    path = os.path.join(out_dir, "submission.csv")
    settings = config.submission
    result = predict_test_set(
        model_dir, config.test_data, path, tta=settings.tta, clip=settings.clip, batch_size=settings.batch_size
    )
    result["model"] = name
    result["status"] = "ok"
    if config.answers:
        result.update({f"test_{k}": v for k, v in score_submission(path, config.answers).items() if k != "rows"})
    return result


DEMO_ENTRIES = {"data", "runs", "ensembles", "onnx", "logs"}  # what a demo holds before its results


def _check_demo_out(out: str, fresh: bool) -> None:
    """Refuse, before any image is generated, an --out the demo can't own: empty, a run folder,
    another study's results, or (``--fresh``, which removes it) a folder that holds no demo."""
    if not out.strip():
        raise KbenchError("--out is empty; name the demo's folder (default reports/demo)")
    found = report_in(out)
    if found is not None:
        name = found.get("name")
        if name != "demo":
            raise KbenchError(f"--out {out} holds the results of study {name!r}, not the demo; choose another --out")
    elif fresh and os.path.isdir(out):
        foreign = sorted(e for e in os.listdir(out) if e not in DEMO_ENTRIES and not e.startswith(".kbench"))
        if foreign:
            raise KbenchError(
                f"--fresh would remove --out {out}, which holds more than a demo ({foreign[0]}); choose another --out"
            )


def run_demo(
    out: str, images: int = 600, fresh: bool = False, backend: str | None = None, echo=print, command: str = ""
) -> tuple[dict, str]:
    """The offline demo: generated Dogs-vs-Cats-style images in Kaggle's layout, then the packaged
    ``demo`` study on them. Returns (results, out)."""
    from kbench.data.synthetic import write_kaggle_dataset

    if isinstance(images, bool) or not isinstance(images, int) or images < 20:
        raise KbenchError(f"--images must be a whole number of at least 20; got {images}")
    _check_demo_out(out, fresh)
    if fresh and os.path.isdir(out):
        with folder_lock(out, what="--out folder"):
            pass  # refuse to remove a folder that another process is using
        shutil.rmtree(out)
    data_dir = os.path.join(out, "data")
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as error:  # a file in the way, /proc, a read-only disk: said before any work
        raise KbenchError(f"can't write the demo to --out {out}: {error.strerror or error}") from None
    if not os.path.isfile(os.path.join(data_dir, "answers.csv")):
        echo(f"writing {images} generated training images (Kaggle layout) to {data_dir}/")
        write_kaggle_dataset(data_dir, n_train=images, n_test=120, image_size=64)
    paths = {"data": "train.zip", "test_data": "test.zip", "answers": "answers.csv"}
    config = load_config(
        packaged_config("demo"),
        backend=backend,
        **{key: os.path.abspath(os.path.join(data_dir, name)) for key, name in paths.items()},
    )
    return run_study(config, out, command=command, echo=echo), out
