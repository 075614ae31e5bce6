"""The whole comparison (``kbench bench``): train every listed backbone, export and time each, build
the ensembles, predict the test set with the best model, write the report.

A study TOML becomes the same dataclasses the commands take (``TrainConfig``, ``EnsembleConfig``,
``LatencyConfig``, ``SubmissionConfig``), strictly: an unknown key, a value of the wrong type, an
unknown backbone, a missing data path or an impossible device count is a one-line error at load
time, before anything trains.

Resumable, keyed by configuration: a finished member is reused only when the settings and data it
recorded are the ones the TOML asks for now (otherwise it is trained again, with a warning); an
ensemble only when its members' models are the ones it was built from; ONNX files and timings
only when made from the same model bytes and options. One member failing doesn't stop the study:
it is retried once at half the batch size if it ran out of memory, else marked failed with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import sys
import typing
from dataclasses import dataclass, field

from kbench import files
from kbench.config import check_keys, check_value, field_names, from_dict
from kbench.ensemble import EnsembleConfig
from kbench.errors import KbenchError, TrainingInterrupted, first_line
from kbench.executors import ExecutorConfig, run_members
from kbench.latency import LatencyConfig
from kbench.runs import (
    CHECKPOINT_STATE,
    CONFIG,
    LATENCY,
    METRICS,
    SPLIT,
    Run,
    data_fingerprint,
    ensure_writable_folder,
    file_hash,
    folder_lock,
)
from kbench.submission import SubmissionConfig
from kbench.trainconfig import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("kbench")

STUDIES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "studies")
RESULTS, REPORT = "results.json", "report.md"
# Settings of a member that don't change what is trained: they never make a finished run stale.
NOT_RESULT_KEYS = ("run_dir", "workers", "cache", "kind")
# [[backbones]] and [train] keys: a TrainConfig's, less what the study itself decides.
STUDY_DECIDES = ("backbone", "data", "run_dir", "backend", "layout")
TRAIN_KEYS = tuple(name for name in field_names(TrainConfig) if name not in STUDY_DECIDES)
ENSEMBLE_KEYS = tuple(
    name for name in field_names(EnsembleConfig) if name not in ("members", "run_dir", "data", "backend", "layout")
)
LATENCY_KEYS = tuple(name for name in field_names(LatencyConfig) if name not in ("models", "export_dir"))
SECTIONS = ("study", "train", "backbones", "ensembles", "latency", "submission")


@dataclass
class StudySettings:
    """The ``[study]`` table."""

    name: str = ""
    data: str = ""
    test_data: str = ""  # empty: no submission
    answers: str = ""  # empty: the submission isn't scored
    backend: str | None = None
    layout: str = "auto"


@dataclass
class Member:
    name: str
    train: TrainConfig  # run_dir filled in by run_study


@dataclass
class EnsembleEntry:
    name: str
    members: list[str]
    config: EnsembleConfig  # members, run_dir filled in by run_study


@dataclass
class StudyConfig:
    name: str
    data: str
    backbones: list[Member]
    ensembles: list[EnsembleEntry] = field(default_factory=list)
    latency: LatencyConfig = field(default_factory=lambda: LatencyConfig(models=[]))
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    test_data: str = ""
    answers: str = ""
    backend: str | None = None
    layout: str = "auto"
    path: str = ""  # the TOML it came from


def packaged_config(name: str) -> str:
    """The path of a study shipped with kbench (``demo``, ``seed``)."""
    path = os.path.join(STUDIES_DIR, f"{name}.toml")
    if not os.path.isfile(path):
        shipped = sorted(os.path.splitext(n)[0] for n in os.listdir(STUDIES_DIR) if n.endswith(".toml"))
        raise KbenchError(f"config not found: {name} (a path, or one of kbench's studies: {', '.join(shipped)})")
    return path


def load_config(path: str, **overrides) -> StudyConfig:
    """Read and check a study TOML. Relative paths in ``[study]`` are relative to the TOML;
    ``overrides`` (data, test_data, answers, backend, layout, devices, mixed_precision) win when not
    None (an empty string clears test_data or answers)."""
    if not os.path.isfile(path):
        if os.sep in path or path.endswith(".toml"):
            raise KbenchError(f"config not found: {path}")
        path = packaged_config(path)
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise KbenchError(f"{path} is not valid TOML: {error}") from None
    check_keys(raw, SECTIONS, path)
    for section in ("study", "train", "latency", "submission"):
        if not isinstance(raw.get(section, {}), dict):
            raise KbenchError(f"{path}: [{section}] must be a table")
    for section in ("backbones", "ensembles"):
        if not isinstance(raw.get(section, []), list):
            raise KbenchError(f"{path}: {section} must be written [[{section}]]")
    study = from_dict(StudySettings, raw.get("study", {}), f"{path} [study]")
    base = os.path.dirname(os.path.abspath(path))

    def located(value: str) -> str:
        return os.path.join(base, value) if value and not os.path.isabs(value) else value

    for key in ("data", "test_data", "answers"):
        setattr(study, key, located(getattr(study, key)))
    train_overrides = {k: overrides.pop(k) for k in ("devices", "mixed_precision") if overrides.get(k) is not None}
    for key, value in overrides.items():
        if value is not None:
            if key not in ("data", "test_data", "answers", "backend", "layout"):
                raise TypeError(f"unknown override {key}")
            setattr(study, key, value)
    if overrides.get("test_data") == "" and overrides.get("answers") is None:
        study.answers = ""  # --test-data '' skips the submission, and so its scoring

    train = raw.get("train", {})
    check_keys(train, TRAIN_KEYS, f"{path} [train]")
    hints = typing.get_type_hints(TrainConfig)
    for key, value in train.items():  # a [train] value is reported against [train], not a member
        check_value(value, hints[key], key, f"{path} [train]")
    entries = raw.get("backbones", [])
    if not entries:
        raise KbenchError(f"{path} lists no [[backbones]]")
    members = []
    for number, entry in enumerate(entries, 1):
        where = f"{path} [[backbones]] #{number}"
        entry = dict(entry)
        check_keys(entry, ("name", "backbone", *TRAIN_KEYS), where)
        if "backbone" not in entry:
            raise KbenchError(f"{where}: needs a 'backbone'")
        name = entry.pop("name", entry["backbone"])
        backbone = entry.pop("backbone")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise KbenchError(f"{where}: name {name!r} must be a plain folder name")
        weights = {**train, **entry}.get("weights")
        if isinstance(weights, str) and weights not in ("none", "imagenet"):
            entry["weights"] = located(weights)  # a weights file, like the data, is relative to the TOML
        config = from_dict(
            TrainConfig,
            {**train, **entry, **train_overrides},
            where,
            backbone=backbone,
            data=study.data,
            run_dir="",
            backend=study.backend,
            layout=study.layout,
        )
        _check_member(config, where)
        members.append(Member(name, config))
    names = [m.name for m in members]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise KbenchError(f"{path}: backbone entries need distinct names ({', '.join(duplicates)} repeated)")

    ensembles = []
    seed = train.get("seed", 0)
    for number, entry in enumerate(raw.get("ensembles", []), 1):
        entry = dict(entry)
        where = f"{path} [[ensembles]] #{number} ({entry.get('name', '?')})"
        check_keys(entry, ("name", "members", *ENSEMBLE_KEYS), where)
        name, member_names = entry.pop("name", None), entry.pop("members", None)
        if not isinstance(name, str) or not name or "/" in name or name in names:
            raise KbenchError(f"{where}: needs a 'name' that no backbone entry uses")
        if not isinstance(member_names, list) or not all(isinstance(m, str) for m in member_names):
            raise KbenchError(f"{where}: members must be a list of backbone entry names")
        unknown = [m for m in member_names if m not in names]
        if unknown:
            raise KbenchError(f"{where}: names unknown members {', '.join(unknown)}")
        entry.setdefault("seed", seed)
        config = from_dict(
            EnsembleConfig,
            entry,
            where,
            members=list(member_names),
            run_dir="",
            data=study.data,
            backend=study.backend,
            layout=study.layout,
        )
        if len(member_names) < 2:
            raise KbenchError(f"{where}: an ensemble needs at least two members")
        try:
            config.check()
        except KbenchError as error:
            raise KbenchError(f"{where}: {error}") from None
        ensembles.append(EnsembleEntry(name, list(member_names), config))

    latency_table = raw.get("latency", {})
    check_keys(latency_table, LATENCY_KEYS, f"{path} [latency]")
    latency = from_dict(LatencyConfig, latency_table, f"{path} [latency]", models=[]).check()
    submission = from_dict(SubmissionConfig, raw.get("submission", {}), f"{path} [submission]").check()
    config = StudyConfig(
        name=study.name or os.path.splitext(os.path.basename(path))[0],
        data=study.data,
        backbones=members,
        ensembles=ensembles,
        latency=latency,
        submission=submission,
        test_data=study.test_data,
        answers=study.answers,
        backend=study.backend,
        layout=study.layout,
        path=os.path.abspath(path),
    )
    _check_paths(config)
    return config


def _check_member(config: TrainConfig, where: str) -> None:
    from kbench.backbones import get_backbone

    try:
        config.check()
        spec = get_backbone(config.backbone)
        if config.image_size is not None and config.image_size < spec.min_image_size:
            raise KbenchError(f"{spec.name} needs image_size of at least {spec.min_image_size}")
    except KbenchError as error:
        raise KbenchError(f"{where}: {error}") from None


def _check_paths(config: StudyConfig) -> None:
    """Every path the study will read, found now rather than after hours of training."""
    if not config.data:
        raise KbenchError("no training data: set [study] data in the config or pass --data")
    for what, path, option in (
        ("training data", config.data, "--data"),
        ("test data", config.test_data, "--test-data"),
        ("answers", config.answers, "--answers"),
    ):
        if path and not os.path.exists(path):
            skip = f", or {option} '' to skip it" if option != "--data" else ""
            raise KbenchError(f"{what} not found: {path} (pass {option} PATH{skip})")
    if config.answers and not config.test_data:
        raise KbenchError("answers are given but no test data to predict (pass --test-data)")


def check_devices(config: StudyConfig) -> None:
    """--devices and --mixed-precision against the devices this backend sees (keras imported)."""
    from kbench.devices import check_devices as check

    for member in config.backbones:
        check(member.train.devices, member.train.batch_size, member.train.mixed_precision)


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
    if split.get("fingerprint") not in (None, fingerprint):
        changed.append("data")
    return changed


def _train_member(member: Member, run_dir: str, fingerprint: str, verbose) -> dict:
    """Train one backbone, or reuse its finished run when it was made with the same settings and
    data; retry once at half the batch size when it runs out of memory."""
    from kbench.train import train

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
    from kbench import __version__
    from kbench.latency import iter_latency
    from kbench.ovruntime import SETTINGS, TOLERANCES
    from kbench.runtimes import SPINNING_CANDIDATES, SPINNING_PROBE, TUNED_CPU_SETTINGS

    run = Run(model_dir)
    key = {
        "model_hash": file_hash(run.model_path),
        **dataclasses.asdict(settings),
        "models": [],
        "export_dir": "",
        # timings belong to the machine and the runtimes' settings that made them
        "host": socket.gethostname(),
        "kbench": __version__,
        "onnxruntime_cpu_settings": {
            **TUNED_CPU_SETTINGS,
            "spinning_candidates": SPINNING_CANDIDATES,
            "spinning_probe": SPINNING_PROBE,
        },
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
    rows = list(iter_latency(config))
    files.write_json(run.file(LATENCY), {"key": key, "rows": rows})
    return rows


def _export(model_dir: str, onnx_dir: str) -> str:
    from kbench.export import onnx_for

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
    (``kbench.executors``); ensembles and the submission follow in this process. Results carry
    ``failed``: the number of members, ensembles and stages that failed (the CLI's exit status 1
    when not zero)."""
    executor = (executor or ExecutorConfig()).check()
    from kbench.backend import use_backend
    from kbench.data import find_images

    config.backend = use_backend(config.backend)
    images = find_images(config.data, layout=config.layout)  # the layout is checked before any training
    fingerprint = data_fingerprint(images)
    check_devices(config)
    prepare_out(config, out_dir, overwrite)
    with folder_lock(out_dir, what="--out folder"):
        files.remove_stale_temporaries(out_dir)
        return _run_locked(config, out_dir, fingerprint, command, verbose, echo, executor)


def member_row(
    member: Member, out_dir: str, fingerprint: str, latency: LatencyConfig, verbose, timing: bool = True
) -> dict:
    """Train (or reuse), export and (``timing``) time one backbone entry into its results row; a
    failure is marked in the row. Executors (``kbench.executors``) run this, in turn or as Ray tasks;
    Ray tasks leave the timing to ``time_member`` in the driver, once no entry trains beside it."""
    run_dir = os.path.join(out_dir, "runs", member.name)
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


def time_member(row: dict, out_dir: str, latency: LatencyConfig) -> None:
    """The latency rows of a finished entry, measured here; a failure marks the row."""
    if row["status"] != "ok":
        return
    try:
        row["latency"] = _latency_rows(os.path.join(out_dir, row["folder"]), os.path.join(out_dir, "onnx"), latency)
    except (TrainingInterrupted, KeyboardInterrupt):
        raise
    except Exception as error:
        row["status"] = f"failed: {first_line(error, named=True) if not isinstance(error, KbenchError) else error}"
        log.warning("%s %s", row["name"], row["status"])


def _run_locked(
    config: StudyConfig, out_dir: str, fingerprint: str, command: str, verbose, echo, executor: ExecutorConfig
) -> dict:
    runs_dir, ensembles_dir, onnx_dir = (os.path.join(out_dir, name) for name in ("runs", "ensembles", "onnx"))
    for folder in (runs_dir, ensembles_dir, onnx_dir):
        os.makedirs(folder, exist_ok=True)
    members = run_members(config, out_dir, fingerprint, verbose, echo, executor)
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
                return {**_ensemble(ensemble_config, verbose), "backbone": backbone}

            if _measure(row, fit, model_dir, onnx_dir, config.latency):
                done[entry.name] = model_dir
        ensembles.append(row)

    rows = members + ensembles
    results = {"name": config.name, "command": command, "backend": config.backend, "rows": rows}
    finished = [row for row in rows if row["status"] == "ok" and row.get("val_log_loss") is not None]
    if finished and config.test_data:
        best = min(finished, key=lambda row: row["val_log_loss"])
        try:
            results["submission"] = _submit(config, done[best["name"]], best["name"], out_dir)
            echo(f"submission from {best['name']}: {results['submission']['path']}")
        except (TrainingInterrupted, KeyboardInterrupt):
            raise
        except Exception as error:  # the report is still written, with the failure in it
            results["submission"] = {"model": best["name"], "status": f"failed: {first_line(error, named=True)}"}
            log.warning("submission %s", results["submission"]["status"])
    results["failed"] = sum(row["status"] != "ok" for row in rows) + int(
        results.get("submission", {}).get("status", "ok") != "ok"
    )
    from kbench.machine import facts
    from kbench.report import write_report

    results["machine"] = facts(config.latency.threads)
    write_report(results, out_dir)
    return results


def _measure(row: dict, fit, model_dir: str, onnx_dir: str, latency: LatencyConfig | None) -> bool:
    """Fit (or reuse) one model, export and time it (unless ``latency`` is None), into ``row``. A
    failure marks the row with its reason instead of stopping the study; returns whether the model
    finished."""
    try:
        row.update(fit())
        row["onnx"] = _export(model_dir, onnx_dir)
        if latency is not None:
            row["latency"] = _latency_rows(model_dir, onnx_dir, latency)
        row["status"] = "ok"
        return True
    except (TrainingInterrupted, KeyboardInterrupt):
        raise
    except Exception as error:
        row["status"] = f"failed: {first_line(error, named=True) if not isinstance(error, KbenchError) else error}"
        log.warning("%s %s", row["name"], row["status"])
        return False


def _ensemble(config: EnsembleConfig, verbose) -> dict:
    """Train the ensemble, or reuse it when it was built from these member models with these settings."""
    from kbench.ensemble import check_members, train_ensemble

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
        if not changed and run.finished:
            return run.metrics
        if changed and run.finished:
            log.warning("%s: %s changed since it was built; building it again", run.name, ", ".join(changed))
        overwrite = True
    return train_ensemble(config, verbose=verbose, overwrite=overwrite)


def _submit(config: StudyConfig, model_dir: str, name: str, out_dir: str) -> dict:
    from kbench.submission import predict_test_set, score_submission

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


def run_demo(
    out: str, images: int = 600, fresh: bool = False, backend: str | None = None, echo=print, command: str = ""
) -> tuple[dict, str]:
    """The offline demo: generated Dogs-vs-Cats-style images in Kaggle's layout, then the packaged
    ``demo`` study on them. Returns (results, out)."""
    from kbench.synthetic import write_kaggle_dataset

    if images < 20:
        raise KbenchError(f"--images must be at least 20; got {images}")
    if fresh and os.path.isdir(out):
        with folder_lock(out, what="--out folder"):
            pass  # refuse to remove a folder that another process is using
        shutil.rmtree(out)
    data_dir = os.path.join(out, "data")
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
