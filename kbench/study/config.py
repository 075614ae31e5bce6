"""A study's TOML (``kbench bench --config``), read into the dataclasses the commands take
(``TrainConfig``, ``EnsembleConfig``, ``LatencyConfig``, ``SubmissionConfig``), strictly: an unknown
key, a value of the wrong type, an unknown backbone, a missing data path or an impossible device
count is a one-line error at load time, before anything trains. ``kbench.study.study`` runs it.

The studies kbench ships (``seed``, ``demo``, ``modern``) are in ``kbench/studies/``, loaded by name.
"""

from __future__ import annotations

import os
import tomllib
import typing
from dataclasses import dataclass, field

from kbench.core.config import check_keys, check_value, field_names, from_dict
from kbench.core.errors import KbenchError
from kbench.serving.latency import LatencyConfig
from kbench.serving.submission import SubmissionConfig
from kbench.training.ensemble import EnsembleConfig
from kbench.training.train import TrainConfig

STUDIES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "studies")
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
    """The path of a study shipped with kbench (``seed``, ``demo``, ``modern``)."""
    path = os.path.join(STUDIES_DIR, f"{name}.toml")
    if not os.path.isfile(path):
        shipped = sorted(os.path.splitext(n)[0] for n in os.listdir(STUDIES_DIR) if n.endswith(".toml"))
        raise KbenchError(f"config not found: {name} (a path, or one of kbench's studies: {', '.join(shipped)})")
    return path


def load_config(path: str, **overrides) -> StudyConfig:
    """Read and check a study TOML. Relative paths in ``[study]`` are relative to the TOML;
    ``overrides`` (data, test_data, answers, backend, layout, devices, mixed_precision) win when not
    None (an empty string clears test_data or answers)."""
    path, raw = _read_toml(path)
    study, train_overrides = _study_settings(raw, path, overrides)
    train = raw.get("train", {})
    check_keys(train, TRAIN_KEYS, f"{path} [train]")
    hints = typing.get_type_hints(TrainConfig)
    for key, value in train.items():  # a [train] value is reported against [train], not a member
        check_value(value, hints[key], key, f"{path} [train]")
    members = _members(raw, path, study, train, train_overrides)
    ensembles = _ensembles(raw, path, study, [m.name for m in members], train.get("seed", 0))
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


def _read_toml(path: str) -> tuple[str, dict]:
    """The TOML's path (a packaged study's, given its name) and its tables, each of the right shape."""
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
    return path, raw


def _located(path: str, value: str) -> str:
    """A path the TOML names, relative to the TOML's folder unless absolute."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), value) if value and not os.path.isabs(value) else value


def _study_settings(raw: dict, path: str, overrides: dict) -> tuple[StudySettings, dict]:
    """The [study] table with its paths located and the command line's overrides applied; the
    overrides meant for every member's TrainConfig (devices, mixed_precision)."""
    study = from_dict(StudySettings, raw.get("study", {}), f"{path} [study]")
    for key in ("data", "test_data", "answers"):
        setattr(study, key, _located(path, getattr(study, key)))
    train_overrides = {k: overrides.pop(k) for k in ("devices", "mixed_precision") if overrides.get(k) is not None}
    for key, value in overrides.items():
        if value is not None:
            if key not in ("data", "test_data", "answers", "backend", "layout"):
                raise TypeError(f"unknown override {key}")
            setattr(study, key, value)
    if overrides.get("test_data") == "" and overrides.get("answers") is None:
        study.answers = ""  # --test-data '' skips the submission, and so its scoring
    return study, train_overrides


def _members(raw: dict, path: str, study: StudySettings, train: dict, train_overrides: dict) -> list[Member]:
    """The [[backbones]] entries, each a TrainConfig: [train] under the entry's own keys, checked."""
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
            entry["weights"] = _located(path, weights)  # a weights file, like the data, is relative to the TOML
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
    return members


def _ensembles(raw: dict, path: str, study: StudySettings, names: list[str], seed: int) -> list[EnsembleEntry]:
    """The [[ensembles]] entries, each over at least two backbone entries (by name), seeded like [train]."""
    ensembles = []
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
    return ensembles


def _check_member(config: TrainConfig, where: str) -> None:
    from kbench.models.backbones import get_backbone

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
    from kbench.training.devices import check_devices as check

    for member in config.backbones:
        check(member.train.devices, member.train.batch_size, member.train.mixed_precision)
