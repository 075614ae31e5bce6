"""One model's stages in a study, each reused only when what made it is unchanged: train (or reuse) a
backbone entry (``member_row``, which the executors run; retried once at half the batch size when it
runs out of memory), build (or reuse) an ensemble (``build_ensemble``), export it and time it
(``measure``, ``time_member``). A failed stage marks its row with the reason instead of stopping the
study, unless a stop request came with it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket

from kbench.core import files
from kbench.core.errors import STOP_REQUESTS, KbenchError, TrainingInterrupted, first_line
from kbench.core.process import stop_if_requested
from kbench.serving.latency import LatencyConfig
from kbench.study.config import Member
from kbench.training.ensemble import EnsembleConfig
from kbench.training.runs import CHECKPOINT_STATE, CONFIG, LATENCY, METRICS, SPLIT, Run, file_hash, folder_lock

log = logging.getLogger("kbench")

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


def build_ensemble(config: EnsembleConfig, fingerprint: str, verbose) -> dict:
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


def _export(model_dir: str, onnx_dir: str) -> str:
    from kbench.export.onnx import onnx_for

    return onnx_for(model_dir, os.path.join(onnx_dir, os.path.basename(model_dir.rstrip("/")) + ".onnx"))["path"]


def _latency_rows(model_dir: str, onnx_dir: str, settings: LatencyConfig) -> list[dict]:
    """Timing rows of one model, kept in its folder under the model's hash and the settings."""
    from kbench.core.version import __version__
    from kbench.serving.latency import iter_latency
    from kbench.serving.onnx_runtime import cpu_settings_record
    from kbench.serving.openvino import SETTINGS, TOLERANCES

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
    measure(row, fit, run_dir, os.path.join(out_dir, "onnx"), latency if timing else None)
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


def measure(row: dict, fit, model_dir: str, onnx_dir: str, latency: LatencyConfig | None) -> bool:
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
    stop_if_requested_from(error)
    row["status"] = f"failed: {first_line(error, named=True) if not isinstance(error, KbenchError) else error}"
    log.warning("%s %s", row["name"], row["status"])


def stop_if_requested_from(error: Exception) -> None:
    """A failure that came with a stop request (a library turned the KeyboardInterrupt into its own
    error) stops the study rather than marking a failed row."""
    if STOP_REQUESTS:
        raise KeyboardInterrupt from error
