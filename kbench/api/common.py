"""What every function of the API shares: the backend choice (quiet, as the command line), the
``Run`` a folder opens as, and the one-line checks of arguments (paths, keyword names and types,
image models).
"""

from __future__ import annotations

import dataclasses
import os

from kbench.core.errors import KbenchError


def use_backend(name: str) -> str:
    """Select the Keras backend (``"jax"`` or ``"tensorflow"``) before keras loads; returns its name.
    Once keras is loaded with another backend, KbenchError says to start a new process (a notebook:
    restart the kernel).

    >>> kbench.use_backend("tensorflow")  # doctest: +SKIP
    'tensorflow'
    """
    from kbench.core.backend import use_backend as select

    _quiet()
    return select(name)


def _quiet() -> None:
    """Other libraries' start-up lines and deprecation warnings kept out of a notebook's output, as
    the command line keeps them off stderr (KBENCH_VERBOSE=1 shows them)."""
    from kbench.core.quiet import set_up

    set_up()


def use_backend_if_unset() -> str:
    """The backend this process uses: the one chosen already, else KERAS_BACKEND or the machine's default."""
    from kbench.core.backend import use_backend as select

    _quiet()
    return select(None)


class Run:
    """A finished run or ensemble folder: ``Run("runs/b0")``. ``path``, ``kind`` ("backbone" or
    "ensemble"), ``config`` (config.json), ``metrics`` (metrics.json), ``history`` (one dict per
    epoch) and ``load_model()`` (the trained keras.Model). A folder that isn't a finished run is a
    KbenchError in one line.

    >>> run = kbench.Run("runs/b0")  # doctest: +SKIP
    >>> run.metrics["val_log_loss"]  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _file(path, "Run's path")
        _ = self._folder  # a folder that isn't a finished run is refused here, in one line

    @property
    def _folder(self):
        """The run folder, checked again on every read: a folder deleted or emptied since is refused."""
        from kbench.training.runs import Run as Folder

        return Folder.open(self.path)

    def __repr__(self) -> str:
        metrics = self._folder.metrics or {}
        loss = metrics.get("val_log_loss")
        what = metrics.get("backbone") or "+".join(metrics.get("backbones") or []) or self.kind
        score = f", val_log_loss={loss:.4g}" if isinstance(loss, (int, float)) else ""
        return f"Run({self.path!r}: {self.kind} {what}{score})"

    @property
    def kind(self) -> str:
        return self._folder.kind

    @property
    def config(self) -> dict:
        return self._folder.config

    @property
    def metrics(self) -> dict:
        return self._folder.metrics or {}

    @property
    def history(self) -> list[dict]:
        return self._folder.history

    @property
    def model_path(self) -> str:
        return self._folder.model_path

    def load_model(self):
        """The trained model (keras.Model), loaded safely (no pickles)."""
        from kbench.models.backbones import load_model

        use_backend_if_unset()
        return load_model(self.model_path)


def _path(model) -> str:
    """A Run, a path-like or a path string -> the path string."""
    if isinstance(model, Run):
        return model.path
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    raise KbenchError(f"expected a run folder, a model file or a kbench.Run; got {type(model).__name__}")


def _file(value, name: str, optional: bool = False) -> str | None:
    """A path argument (str or os.PathLike) as a string; anything else is a one-line KbenchError."""
    if value is None and optional:
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    raise KbenchError(f"{name} must be a path (str or os.PathLike); got {type(value).__name__}")


def _verbose(quiet: bool):
    return 0 if quiet else "auto"


def _check_names(given: dict, config_class, command: str) -> None:
    """An unknown keyword is refused with the closest option, never dropped."""
    import difflib

    fields = {field.name for field in dataclasses.fields(config_class)}
    for name in given:
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise KbenchError(f"unknown option {name!r} for {command}{hint}")
    _check_types(given, config_class)


def _check_types(given: dict, config_class) -> None:
    """A value of the wrong type is refused in one line: ``augment="no"`` would augment, ``epochs="2"``
    fail deep inside. Whole numbers are ints (not bools), numbers int or float, flags bools."""
    import types
    import typing

    hints = typing.get_type_hints(config_class)
    for name, value in given.items():
        kinds = (
            set(typing.get_args(hints[name]))
            if typing.get_origin(hints[name]) in (typing.Union, types.UnionType)
            else {hints[name]}
        )
        kinds.discard(type(None))
        if value is None or object in kinds or any(typing.get_origin(kind) is not None for kind in kinds):
            continue  # lists and other generics: checked by the config itself
        if bool in kinds:
            ok = isinstance(value, bool)
        elif float in kinds:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif int in kinds:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif str in kinds:
            ok = isinstance(value, (str, os.PathLike))
        else:
            continue
        if not ok:
            wanted = " or ".join(sorted(kind.__name__ for kind in kinds))
            raise KbenchError(f"{name} must be {wanted}; got {value!r} ({type(value).__name__})")


def _is_keras_model(model) -> bool:
    return type(model).__module__.startswith("keras") or hasattr(model, "get_config") and hasattr(model, "inputs")


def check_image_model(model) -> None:
    """One image input, NHWC with 3 channels: what kbench exports and times; KbenchError otherwise."""
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        raise KbenchError(f"model {model.name!r} has {len(inputs)} inputs; kbench takes models with one image input")
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise KbenchError(
            f"model {model.name!r} takes {shape}; kbench takes RGB images, NHWC (batch, height, width, 3)"
        )
    if shape[1] is None or shape[2] is None:
        from kbench.export.convert import fixed_size_needed

        raise KbenchError(fixed_size_needed(model.name, shape))


def _listed(value, default: list, kind) -> list:
    if value is None:
        return list(default)
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (int, float)):
        value = [value]
    try:
        return [kind(item) for item in value]
    except (TypeError, ValueError):
        raise KbenchError(f"expected {kind.__name__}s (a list, or a comma-separated string); got {value!r}") from None
