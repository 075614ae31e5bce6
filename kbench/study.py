"""The whole comparison (``kbench bench``): train every listed backbone, export and time each, build
the ensembles, predict the test set with the best model, write the report.

Resumable: each stage leaves a file that the next run finds (a run's ``metrics.json``, an ONNX file,
``latency.json``, an ensemble's ``metrics.json``) and skips. One member failing doesn't stop the
study: it is retried once at half the batch size, then marked failed with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field

from kbench import doctor, files
from kbench.errors import KbenchError, TrainingInterrupted

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("kbench")

TRAIN_KEYS = ("epochs", "batch_size", "image_size", "lr", "weights", "augment", "val_split", "seed", "cache",
              "freeze_backbone", "workers", "devices", "mixed_precision")


@dataclass
class StudyConfig:
    name: str
    data: str
    backbones: list[dict]  # each: backbone, name (default: backbone) and any TRAIN_KEYS override
    train: dict = field(default_factory=dict)
    ensembles: list[dict] = field(default_factory=list)
    latency: dict = field(default_factory=dict)
    submission: dict = field(default_factory=dict)
    test_data: str = ""
    answers: str = ""
    backend: str | None = None


def load_config(path: str, **overrides) -> StudyConfig:
    """Read a study TOML; relative data paths are relative to the config file. ``overrides`` (data,
    test_data, answers, backend) win when not None."""
    if not os.path.isfile(path):
        raise KbenchError(f"config not found: {path}")
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise KbenchError(f"{path} is not valid TOML: {error}") from None
    study = raw.get("study", {})
    base = os.path.dirname(os.path.abspath(path))

    def located(value):
        return os.path.join(base, value) if value and not os.path.isabs(value) else value

    backbones = [dict(entry) for entry in raw.get("backbones", [])]
    if not backbones:
        raise KbenchError(f"{path} lists no [[backbones]]")
    for entry in backbones:
        if "backbone" not in entry:
            raise KbenchError(f"{path}: every [[backbones]] entry needs a 'backbone'")
        entry.setdefault("name", entry["backbone"])
    names = [entry["name"] for entry in backbones]
    if len(set(names)) < len(names):
        raise KbenchError(f"{path}: backbone entries need distinct names")
    for ensemble in raw.get("ensembles", []):
        unknown = [m for m in ensemble.get("members", []) if m not in names]
        if unknown or "name" not in ensemble:
            raise KbenchError(f"{path}: ensemble {ensemble.get('name', '?')} names unknown members {unknown}")
    config = StudyConfig(
        name=study.get("name", os.path.splitext(os.path.basename(path))[0]),
        data=located(study.get("data", "")),
        test_data=located(study.get("test_data", "")),
        answers=located(study.get("answers", "")),
        backend=study.get("backend"),
        backbones=backbones,
        train=raw.get("train", {}),
        ensembles=raw.get("ensembles", []),
        latency=raw.get("latency", {}),
        submission=raw.get("submission", {}),
    )
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if not config.data:
        raise KbenchError("no training data: set [study] data in the config or pass --data")
    return config


def _train_member(config: StudyConfig, entry: dict, run_dir: str, verbose) -> dict:
    """Train one backbone (or reuse its finished run); retry once at half the batch size."""
    from kbench.train import METRICS, TrainConfig, resume_config, train

    if os.path.isfile(os.path.join(run_dir, METRICS)):
        return files.read_json(os.path.join(run_dir, METRICS))
    options = {key: value for key, value in {**config.train, **entry}.items() if key in TRAIN_KEYS}
    train_config = TrainConfig(backbone=entry["backbone"], data=config.data, run_dir=run_dir,
                               backend=config.backend, **options)
    if os.path.isfile(os.path.join(run_dir, "checkpoint.json")):
        return train(resume_config(run_dir), resume=True, verbose=verbose)
    try:
        return train(train_config, verbose=verbose)
    except (TrainingInterrupted, KeyboardInterrupt):
        raise
    except Exception as error:  # out of memory, a bad weight file, ...: one retry at half the batch
        half = max(1, train_config.batch_size // 2)
        log.warning("%s failed (%s); retrying once at batch size %d", entry["name"], _one_line(error), half)
        shutil.rmtree(run_dir, ignore_errors=True)
        return train(dataclasses.replace(train_config, batch_size=half), verbose=verbose)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _latency_rows(model_dir: str, onnx_dir: str, settings: dict) -> list[dict]:
    """Timing rows of one model, cached in ``latency.json`` beside it."""
    from kbench.latency import LatencyConfig, iter_latency

    path = os.path.join(model_dir, "latency.json")
    if os.path.isfile(path):
        return files.read_json(path)
    config = LatencyConfig([model_dir], export_dir=onnx_dir, **settings)
    rows = list(iter_latency(config))
    files.write_json(path, rows)
    return rows


def _export(model_dir: str, onnx_dir: str) -> str:
    from kbench.export import export_onnx, run_metadata

    path = os.path.join(onnx_dir, os.path.basename(model_dir.rstrip("/")) + ".onnx")
    if not os.path.isfile(path):
        export_onnx(model_dir, path, metadata=run_metadata(model_dir))
    return path


def run_study(config: StudyConfig, out_dir: str, command: str = "", verbose=0, echo=print) -> dict:
    """Run (or resume) the study into ``out_dir``; returns the results written to results.json."""
    from kbench.backend import use_backend

    config.backend = use_backend(config.backend)
    doctor.warn_if_gpu_unseen(config.backend)
    runs_dir, ensembles_dir, onnx_dir = (os.path.join(out_dir, name) for name in ("runs", "ensembles", "onnx"))
    for folder in (runs_dir, ensembles_dir, onnx_dir):
        os.makedirs(folder, exist_ok=True)
    latency_settings = {k: v for k, v in config.latency.items() if k in ("runtimes", "batch_sizes", "runs", "warmup",
                                                                          "threads")}
    members, done = [], {}
    for index, entry in enumerate(config.backbones, 1):
        run_dir = os.path.join(runs_dir, entry["name"])
        echo(f"[{index}/{len(config.backbones)}] {entry['name']}: training, exporting, timing")
        row = {"name": entry["name"], "kind": "backbone", "backbone": entry["backbone"]}
        if _measure(row, lambda: _train_member(config, entry, run_dir, verbose), run_dir, onnx_dir, latency_settings):
            done[entry["name"]] = run_dir
        members.append(row)

    ensembles = []
    for spec in config.ensembles:
        row = {"name": spec["name"], "kind": "ensemble", "backbone": "+".join(spec["members"])}
        missing = [m for m in spec["members"] if m not in done]
        if missing:
            row["status"] = f"failed: member(s) {', '.join(missing)} failed"
        else:
            echo(f"ensemble {spec['name']}: {spec.get('method', 'stack')} of {len(spec['members'])}")
            model_dir = os.path.join(ensembles_dir, spec["name"])
            member_dirs = [done[m] for m in spec["members"]]

            def fit(spec=spec, member_dirs=member_dirs):  # metrics.json's "backbone" is "ensemble"
                return {**_ensemble(config, spec, member_dirs, ensembles_dir, verbose), "backbone": row["backbone"]}

            if _measure(row, fit, model_dir, onnx_dir, latency_settings):
                done[spec["name"]] = model_dir
        ensembles.append(row)

    rows = members + ensembles
    results = {"name": config.name, "command": command, "backend": config.backend, "rows": rows}
    finished = [row for row in rows if row["status"] == "ok" and row.get("val_log_loss") is not None]
    if finished and config.test_data:
        best = min(finished, key=lambda row: row["val_log_loss"])
        results["submission"] = _submit(config, done[best["name"]], best["name"], out_dir)
        echo(f"submission from {best['name']}: {results['submission']['path']}")
    from kbench.latency import machine_info
    from kbench.report import write_report

    results["machine"] = machine_info(latency_settings.get("threads"))
    write_report(results, out_dir)
    return results


def _measure(row: dict, fit, model_dir: str, onnx_dir: str, latency_settings: dict) -> bool:
    """Fit (or reuse) one model, export and time it, into ``row``. A failure marks the row with its
    reason instead of stopping the study; returns whether the model finished."""
    try:
        row.update(fit())
        row["onnx"] = _export(model_dir, onnx_dir)
        row["latency"] = _latency_rows(model_dir, onnx_dir, latency_settings)
        row["status"] = "ok"
        return True
    except (TrainingInterrupted, KeyboardInterrupt):
        raise
    except Exception as error:
        row["status"] = f"failed: {_one_line(error)}"
        log.warning("%s %s", row["name"], row["status"])
        return False


def _ensemble(config: StudyConfig, spec: dict, member_dirs: list[str], ensembles_dir: str, verbose) -> dict:
    from kbench.ensemble import EnsembleConfig, train_ensemble

    run_dir = os.path.join(ensembles_dir, spec["name"])
    if os.path.isfile(os.path.join(run_dir, "metrics.json")):
        return files.read_json(os.path.join(run_dir, "metrics.json"))
    options = {key: spec[key] for key in ("method", "epochs", "lr", "tta_passes", "batch_size") if key in spec}
    return train_ensemble(EnsembleConfig(member_dirs, run_dir, data=config.data, backend=config.backend,
                                         seed=config.train.get("seed", 0), **options), verbose=verbose)


def _submit(config: StudyConfig, model_dir: str, name: str, out_dir: str) -> dict:
    from kbench.submission import predict_test_set, score_submission

    path = os.path.join(out_dir, "submission.csv")
    result = predict_test_set(model_dir, config.test_data, path, tta=config.submission.get("tta", "none"),
                              clip=config.submission.get("clip"))
    result["model"] = name
    if config.answers and os.path.isfile(config.answers):
        result.update({f"test_{k}": v for k, v in score_submission(path, config.answers).items() if k != "rows"})
    return result
