"""The whole comparison (``kbench bench``): train every listed backbone, export and time each, build
the ensembles, predict the test set with the best model, write the report. The study's TOML is
read by ``kbench.study.config``; the backbone entries run in turn or on Ray (``kbench.study.executors``).

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
import socket

from kbench.core import files
from kbench.core.errors import STOP_REQUESTS, KbenchError, TrainingInterrupted, first_line
from kbench.core.process import stop_if_requested
from kbench.serving.latency import LatencyConfig
from kbench.study.config import Member, StudyConfig, check_devices, load_config, packaged_config
from kbench.study.executors import ExecutorConfig, run_members
from kbench.training.ensemble import EnsembleConfig
from kbench.training.runs import (
    CHECKPOINT_STATE,
    CONFIG,
    LATENCY,
    METRICS,
    SPLIT,
    Run,
    ensure_writable_folder,
    file_hash,
    folder_lock,
)

log = logging.getLogger("kbench")

RESULTS = "results.json"
# Settings of a member that don't change what is trained: they never make a finished run stale.
NOT_RESULT_KEYS = ("run_dir", "workers", "cache", "kind")


def _out_of_memory(error: BaseException) -> bool:
    """Resource exhaustion (worth a retry at half the batch), as each backend reports it."""
    if isinstance(error, MemoryError):
        return True
    text = f"{type(error).__name__} {error}".lower()
    return any(mark in text for mark in ("resource_exhausted", "resourceexhausted", "out of memory", "oom when"))


def _stale(run: Run, wanted: dict, fingerprint: str) -> list[str]:
    """The settings in which a finished or interrupted run differs from ``wanted`` (config.json form)."""
    try:
        recorded = run.config
        split = run.split if run.exists(SPLIT) else {}
    except KbenchError:
        return ["unreadable config"]
    metrics = run.metrics or {}
    wanted = dict(wanted)
    halved_from = metrics.get("batch_size_halved_from") or recorded.get("batch_size_halved_from")
    if halved_from and halved_from == wanted.get("batch_size"):
        wanted["batch_size"] = max(1, halved_from // 2)
    keys = sorted((set(recorded) | set(wanted)) - set(NOT_RESULT_KEYS) - {"batch_size_halved_from"})
    changed = [key for key in keys if recorded.get(key) != wanted.get(key)]
    if split:
        changed += _data_changed(split, fingerprint)
    return changed


def _data_changed(split: dict, fingerprint: str) -> list[str]:
    """["data"] when split.json's data is not the set fingerprinted ``fingerprint`` (content included),
    or when it says nothing of the content (an earlier kbench recorded names only): it can't be reused."""
    recorded = split.get("content_fingerprint")
    if recorded == fingerprint:
        return []
    return ["data" if recorded else "data (its content was not recorded by the kbench that made it)"]


def _train_member(member: Member, run_dir: str, fingerprint: str, verbose) -> dict:
    """Train one backbone, or reuse its finished run when it was made with the same settings and
    data; retry once at half the batch size when it runs out of memory."""
    from kbench.training.train import train

    config = dataclasses.replace(member.train, run_dir=run_dir).resolved()
    run = Run(run_dir)
    wanted = config.record()
    resume = overwrite = False
    if run.exists(METRICS) or run.exists(CHECKPOINT_STATE):
        changed = _stale(run, wanted, fingerprint)
        if not changed and run.finished:
            return run.metrics
        if changed:
            log.warning(
                "%s: settings changed since it was trained (%s); training it again", member.name, ", ".join(changed)
            )
            overwrite = True
        else:
            resume = True
            done = len((run.read_checkpoint() or {}).get("history", []))
            log.info("%s: resuming from its checkpoint after epoch %d", member.name, done)
    try:
        return train(config, resume=resume, overwrite=overwrite, verbose=verbose)
    except (TrainingInterrupted, KeyboardInterrupt, KbenchError):
        raise
    except Exception as error:
        if not _out_of_memory(error) or config.batch_size == 1:
            raise
        half = max(1, config.batch_size // 2)
        log.warning(
            "%s ran out of memory (%s); retrying once at batch size %d",
            member.name,
            first_line(error, named=True),
            half,
        )
        record = train(dataclasses.replace(config, batch_size=half), overwrite=True, verbose=verbose)
        record["batch_size_halved_from"] = config.batch_size
        run.write_metrics(record)
        return record


def _latency_rows(model_dir: str, onnx_dir: str, settings: LatencyConfig) -> list[dict]:
    """Timing rows of one model, kept in its folder under the model's hash and the settings."""
    from kbench.core.version import __version__
    from kbench.serving.latency import iter_latency
    from kbench.serving.openvino import SETTINGS, TOLERANCES
    from kbench.serving.onnx_runtime import cpu_settings_record

    run = Run(model_dir)
    key = {
        "model_hash": file_hash(run.model_path),
        **dataclasses.asdict(settings),
        "models": [],
        "export_dir": "",
        # timings belong to the machine and the runtimes' settings that made them
        "host": socket.gethostname(),
        "kbench": __version__,
        "onnxruntime_cpu_settings": cpu_settings_record(),
        "openvino_settings": {**SETTINGS, "tolerances": TOLERANCES},
    }
    if run.exists(LATENCY):
        try:
            saved = files.read_json(run.file(LATENCY))
        except ValueError:
            saved = None
        if isinstance(saved, dict) and saved.get("key") == key:
            return saved["rows"]
    config = dataclasses.replace(settings, models=[model_dir], export_dir=onnx_dir)
    rows = []
    for row in iter_latency(config):
        rows.append(row)
        stop_if_requested()  # between rows: a stop request whose KeyboardInterrupt was lost waits no longer
    files.write_json(run.file(LATENCY), {"key": key, "rows": rows})
    return rows


def _export(model_dir: str, onnx_dir: str) -> str:
    from kbench.export.onnx import onnx_for

    return onnx_for(model_dir, os.path.join(onnx_dir, os.path.basename(model_dir.rstrip("/")) + ".onnx"))["path"]


def prepare_out(config: StudyConfig, out_dir: str, overwrite: bool = False) -> None:
    """Refuse an --out folder that holds something else: a run folder, or another study's results."""
    ensure_writable_folder(out_dir, "--out")
    if Run(out_dir).exists(CONFIG):
        raise KbenchError(f"--out {out_dir} is a run folder; choose another --out")
    results = os.path.join(out_dir, RESULTS)
    if os.path.isfile(results) and not overwrite:
        try:
            previous = files.read_json(results).get("name")
        except (ValueError, AttributeError):
            previous = "?"
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


def member_row(
    member: Member,
    out_dir: str,
    fingerprint: str,
    latency: LatencyConfig,
    verbose,
    timing: bool = True,
    lock_wait_seconds: float = 0,
) -> dict:
    """Train (or reuse), export and (``timing``) time one backbone entry into its results row; a
    failure is marked in the row. Executors (``kbench.study.executors``) run this, in turn or as Ray tasks;
    Ray tasks leave the timing to ``time_member`` in the driver, once no entry trains beside it. An
    entry started again after its node was lost first waits up to ``lock_wait_seconds`` for its run
    folder's lock (a dead node's lock on NFS lasts until its lease expires)."""
    run_dir = os.path.join(out_dir, "runs", member.name)
    if lock_wait_seconds:
        _wait_unlocked(run_dir, lock_wait_seconds)
    row = {
        "name": member.name,
        "kind": "backbone",
        "backbone": member.train.backbone,
        "folder": os.path.relpath(run_dir, out_dir),  # for report.md's links
        "host": socket.gethostname(),  # where it trained
    }
    fit = lambda: _train_member(member, run_dir, fingerprint, verbose)  # noqa: E731
    _measure(row, fit, run_dir, os.path.join(out_dir, "onnx"), latency if timing else None)
    return row


def _wait_unlocked(run_dir: str, seconds: float) -> None:
    """Return once nobody holds ``run_dir``'s lock, or after ``seconds`` (training then refuses the
    folder in use, in one line, as it would have)."""
    import time

    deadline = time.monotonic() + seconds
    while os.path.isdir(run_dir):
        try:
            with folder_lock(run_dir, what="run folder"):
                return
        except KbenchError:
            if time.monotonic() > deadline:
                return
            time.sleep(1)


def time_member(row: dict, out_dir: str, latency: LatencyConfig) -> None:
    """The latency rows of a finished entry, measured here; a failure marks the row."""
    if row["status"] != "ok":
        return
    try:
        stop_if_requested()
        row["latency"] = _latency_rows(os.path.join(out_dir, row["folder"]), os.path.join(out_dir, "onnx"), latency)
    except (TrainingInterrupted, KeyboardInterrupt):
        raise
    except Exception as error:
        _mark_failed(row, error)


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
                return {**_ensemble(ensemble_config, fingerprint, verbose), "backbone": backbone}

            if _measure(row, fit, model_dir, onnx_dir, config.latency):
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
            _stop_if_requested_from(error)
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


def _measure(row: dict, fit, model_dir: str, onnx_dir: str, latency: LatencyConfig | None) -> bool:
    """Fit (or reuse) one model, export and time it (unless ``latency`` is None), into ``row``. A
    failure marks the row with its reason instead of stopping the study; returns whether the model
    finished."""
    try:
        stop_if_requested()  # a stop request stops the study between stages, even one Python swallowed
        row.update(fit())
        stop_if_requested()
        row["onnx"] = _export(model_dir, onnx_dir)
        stop_if_requested()
        if latency is not None:
            row["latency"] = _latency_rows(model_dir, onnx_dir, latency)
        row["status"] = "ok"
        return True
    except (TrainingInterrupted, KeyboardInterrupt):
        raise
    except Exception as error:
        _mark_failed(row, error)
        return False


def _mark_failed(row: dict, error: Exception) -> None:
    """A stage's failure marks its row (the study goes on), unless it came with a stop request."""
    _stop_if_requested_from(error)
    row["status"] = f"failed: {first_line(error, named=True) if not isinstance(error, KbenchError) else error}"
    log.warning("%s %s", row["name"], row["status"])


def _stop_if_requested_from(error: Exception) -> None:
    """A failure that came with a stop request (a library turned the KeyboardInterrupt into its own
    error) stops the study rather than marking a failed row."""
    if STOP_REQUESTS:
        raise KeyboardInterrupt from error


def _ensemble(config: EnsembleConfig, fingerprint: str, verbose) -> dict:
    """Train the ensemble, or reuse it when it was built from these member models with these settings
    on the data fingerprinted ``fingerprint``."""
    from kbench.training.ensemble import check_members, train_ensemble

    run = Run(config.run_dir)
    overwrite = False
    if run.exists(METRICS) or run.exists(CONFIG):
        members, _ = check_members(config)
        wanted = {
            "kind": "ensemble",
            **dataclasses.asdict(config),
            "member_hashes": {m.name: m.model_hash for m in members},
        }
        try:
            recorded = run.config
        except KbenchError:
            recorded = {}
        changed = [
            k
            for k in sorted(set(recorded) | set(wanted))
            if k not in NOT_RESULT_KEYS and recorded.get(k) != wanted.get(k)
        ]
        if run.exists(SPLIT):
            changed += _data_changed(run.split, fingerprint)
        if not changed and run.finished:
            return run.metrics
        if changed and run.finished:
            log.warning("%s: %s changed since it was built; building it again", run.name, ", ".join(changed))
        overwrite = True
    return train_ensemble(config, verbose=verbose, overwrite=overwrite)


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
    if Run(out).exists(CONFIG):
        raise KbenchError(f"--out {out} is a run folder; choose another --out")
    results = os.path.join(out, RESULTS)
    if os.path.isfile(results):
        try:
            name = files.read_json(results).get("name")
        except (ValueError, AttributeError, OSError):
            name = "?"
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
