"""The plumbing of ``kbench.cli.main``: click options built from the config dataclasses (flag, type,
choices, help and default all come from the field), errors turned into exit codes, the process
set-up every command shares, and the warnings a user should see before a command's work (a GPU
that ``nvidia-smi`` lists and the backend or ONNX Runtime doesn't see).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import types
import typing

import click

from kbench.core.config import default, options_of
from kbench.core.errors import STOP_REQUESTS, KbenchError, TrainingInterrupted, first_line


class Command(click.Command):
    """An option given twice with values that may differ is refused (exit 2): click would keep the
    last one silently, so ``--runtime keras-compiled --runtime onnxruntime-cpu`` timed onnxruntime-cpu
    alone, and ``--x`` with ``--no-x`` would be decided by their order. The same flag twice is harmless."""

    def parse_args(self, ctx, args):
        given: dict[str, str] = {}
        for name, param in _options_given(self.get_params(ctx), args, ctx.allow_interspersed_args):
            if param.name not in given:
                given[param.name] = name
                continue
            earlier = given[param.name]
            if param.is_flag and earlier == name:
                continue
            if param.is_flag:
                raise click.UsageError(f"{earlier} and {name} contradict each other; give one", ctx)
            listed = "comma-separated" in (param.help or "").lower()
            hint = f" (a list is comma-separated: {name} a,b)" if listed else ""
            shown = name if earlier == name else f"{earlier} and {name} (one option)"
            raise click.UsageError(f"{shown} given twice; give it once{hint}", ctx)
        return super().parse_args(ctx, args)


def _options_given(params, args: list[str], interspersed: bool):
    """(the name as typed, its click option) for each option in ``args``, in order: each option's value
    is skipped, and the scan ends at ``--`` (or at the first argument, where options come first only)."""
    names = {}
    for param in params:
        if isinstance(param, click.Option) and not param.multiple and not param.count:
            for name in (*param.opts, *param.secondary_opts):
                names[name] = param
    tokens = iter(args)
    for token in tokens:
        if token == "--":
            return
        if not token.startswith("-") or token == "-":
            if not interspersed:
                return
            continue
        name, attached = token, False
        if token.startswith("--") and "=" in token:
            name, attached = token.split("=", 1)[0], True
        elif not token.startswith("--") and len(token) > 2 and token[:2] in names:
            name, attached = token[:2], True  # -oFILE
        param = names.get(name)
        if param is None:
            continue  # not an option of this command: click refuses it
        yield name, param
        if not param.is_flag and not attached:
            for _ in range(param.nargs):
                next(tokens, None)


class Group(click.Group):
    """Errors as one line: KbenchError exits 2, an interrupted run 130/143, an unexpected exception
    1 (``--debug`` or KBENCH_DEBUG=1 shows its traceback instead). Its commands refuse an option given
    twice (``Command``); its subgroups are Groups too."""

    command_class = Command
    group_class = type

    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
            if STOP_REQUESTS:  # a signal whose KeyboardInterrupt was swallowed on the way: not a success
                click.echo("kbench: interrupted", err=True)
                ctx.exit(128 + STOP_REQUESTS[0])
            return result
        except TrainingInterrupted as stopped:
            click.echo(f"kbench: {stopped}", err=True)
            ctx.exit(128 + stopped.signal_number)
        except KbenchError as error:
            click.echo(f"kbench: error: {error}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see _terminate), outside training's own handling
            click.echo("kbench: interrupted", err=True)
            if debug():
                raise
            ctx.exit(128 + (STOP_REQUESTS[0] if STOP_REQUESTS else signal.SIGINT))
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as error:
            if debug():
                raise
            click.echo(
                f"kbench: error: unexpected {first_line(error, named=True)} (run with --debug for the traceback)",
                err=True,
            )
            ctx.exit(1)


def debug() -> bool:
    return os.environ.get("KBENCH_DEBUG", "") not in ("", "0")


def _set_backend(ctx, param, value):
    from kbench.core.backend import use_backend

    try:
        return use_backend(value)
    except KbenchError as error:
        raise click.BadParameter(str(error)) from None


def _options(*decorators):
    def apply(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


def _int_list(ctx, param, value):
    try:
        numbers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter("use comma-separated whole numbers, e.g. 1,8,32") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter("use comma-separated positive whole numbers, e.g. 1,8,32")
    return numbers


def from_config(cls, *names, defaults: bool = True, required: tuple = ()):
    """Click options built from a config dataclass's fields: the flag, type, choices, help and
    default all come from the field (``kbench.core.config.option``). ``defaults=False`` leaves unset
    options None, so that a command can tell what was given (``train --resume``)."""
    fields, hints = options_of(cls), typing.get_type_hints(cls)
    decorators = []
    for name in " ".join(names).split():  # names, or strings of space-separated names
        meta = fields[name]
        flag = "--" + meta.get("flag", name).replace("_", "-")
        kind = hints[name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: the option is X
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        value = default(cls, name, missing=None)
        shown = meta.get("shown_default", "on" if value is True else value)
        shown = ",".join(map(str, shown)) if isinstance(shown, list) else shown
        text = meta["help"] + (f"  [default: {shown}]" if shown is not None and shown is not False else "")
        options = {"help": text, "required": name in required, "default": value if defaults else None}
        if kind is bool:
            flag, options["default"] = (f"{flag}/--no-{flag[2:]}" if value else flag), (value if defaults else None)
            options["is_flag"] = True
        elif typing.get_origin(kind) is list:
            options["default"] = ",".join(map(str, value))
            options["callback"] = (
                _int_list
                if typing.get_args(kind) == (int,)
                else (lambda ctx, param, text: [part.strip() for part in text.split(",") if part.strip()])
            )
        elif "choices" in meta:
            options["type"] = click.Choice(list(meta["choices"]))
            if "flag_value" in meta:
                options.update(is_flag=False, flag_value=meta["flag_value"])
                options["help"] += f"  [flag alone: {meta['flag_value']}]"
        else:
            options["type"] = click.Path() if meta.get("path") else kind
        decorators.append(click.option(flag, name, **options))
    return _options(*decorators)


backend_option = click.option(
    "--backend",
    type=click.Choice(["jax", "tensorflow"]),
    default=None,
    is_eager=True,
    callback=_set_backend,
    help="Keras backend (default: $KERAS_BACKEND, else jax with a GPU, tensorflow without).",
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace a finished run in the folder.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bar.")


def set_up_process(debug_flag: bool = False, verbose_flag: bool = False) -> None:
    """--debug, then --verbose (else other libraries' start-up lines are kept off stderr), SIGTERM
    unwinding like Ctrl-C, and kbench's log lines on stderr (``kbench.core.process.set_up``)."""
    from kbench.core.process import set_up

    if debug_flag:
        os.environ["KBENCH_DEBUG"] = "1"
    set_up(verbose_flag)  # before --backend is read: kbench.core.backend's defaults must not win


_gpu_warned = False


def warn_if_gpu_unseen(backend: str | None) -> None:
    """Before ``train``, ``latency``, ``bench`` and ``demo``: log ``kbench.cli.doctor.gpu_warning`` for
    ``backend`` (None: the one kbench would choose) on the "kbench" logger, at most once per process.
    Library code never warns about the machine itself: it would need the CLI's doctor."""
    global _gpu_warned
    if _gpu_warned:
        return
    _gpu_warned = True
    from kbench.cli.doctor import gpu_warning
    from kbench.core.backend import choose_backend

    message = gpu_warning(choose_backend(backend)[0])
    if message:
        logging.getLogger("kbench").warning(message)


def run(group: click.Group) -> None:
    """The console entry point: Ctrl-C or SIGTERM outside a command's own handling (while loading,
    say) is one line and exit 130 (143), its traceback only with --debug. A stopped command ends
    without the interpreter's teardown (``kbench.core.process.exit_now``)."""
    import traceback

    from kbench.core.process import exit_now

    try:
        group(prog_name="kbench")
    except KeyboardInterrupt:
        click.echo("kbench: interrupted", err=True)
        if debug():
            traceback.print_exc()
        exit_now(128 + (STOP_REQUESTS[0] if STOP_REQUESTS else signal.SIGINT))
    except SystemExit as done:
        together = sys.modules.get("kbench.training.distributed")  # one of several processes training as one
        if done.code not in (0, None) and together and together.process_count() > 1:
            together.leave()  # stopped or refused: not JAX's 30-minute shutdown wait for the others
            exit_now(done.code)
        if STOP_REQUESTS or done.code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            exit_now(done.code)
        raise


def flag(declaration: str, help: str, name: str | None = None):
    """An on/off option."""
    return click.option(declaration, *([name] if name else []), is_flag=True, help=help)


def format_option(*choices: str):
    """``--format``, the first choice by default."""
    return click.option(
        "--format",
        "output_format",
        type=click.Choice(list(choices)),
        default=choices[0],
        show_default=True,
        help="How the result is written.",
    )


def command_line() -> str:
    """The command as typed, for reports."""
    return "kbench " + " ".join(sys.argv[1:])


def echo_err(line: str) -> None:
    click.echo(line, err=True)


class ProgressBar:
    """A click progress bar on stderr, drawn from a library function's ``progress(done, total)``
    callback: opened at the first call (after the function's own checks), closed on leaving.

    >>> with ProgressBar("timing") as bar:  # doctest: +SKIP
    ...     rows, interrupted = measure(config, progress=bar)
    """

    def __init__(self, label: str, hidden: bool = False):
        self.label, self.hidden, self.bar = label, hidden, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, hidden=self.hidden)
            self.bar.__enter__()
        self.bar.update(done - self.bar.pos)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *error) -> None:
        if self.bar is not None:
            self.bar.__exit__(*error)
