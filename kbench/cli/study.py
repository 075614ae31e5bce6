"""The study's commands, ``kbench bench`` and ``kbench demo`` (added to the ``kbench`` group by
``kbench.cli.main``): parse, run the study, print its summary; exit status 1 when a stage failed."""

from __future__ import annotations

import sys

import click

import kbench
from kbench.cli import options as opt
from kbench.study.executors import ExecutorConfig as _X
from kbench.training.config import TrainConfig as _T


def show_study(results: dict, out: str) -> None:
    """Print a study's (or a comparison's) summary; exit status 1 when any of its stages failed."""
    from kbench.cli.summaries import study_summary

    click.echo(study_summary(results, out))
    if results.get("failed"):
        sys.exit(1)


@click.command(cls=opt.Command)
@click.option("--config", "config_path", required=True, help="Study TOML, or one kbench ships: seed, demo, modern.")
@click.option("--data", type=click.Path(), help="Training images (overrides the config).")
@click.option("--test-data", type=click.Path(), help="Test images for the submission ('' for none).")
@click.option("--answers", type=click.Path(), help="id,label CSV to score the submission (overrides the config).")
@opt.backend_option
@opt.from_config(_T, "layout", defaults=False)
@click.option("--out", type=click.Path(), help="Report folder.  [default: reports/NAME]")
@opt.from_config(_T, "devices", "mixed_precision", defaults=False)
@click.option("--progress/--quiet", default=False, help="Keras progress bars while training.")
@opt.flag("--overwrite", "Start over in an --out folder that holds another study.")
@opt.from_config(_X, "executor", "address")
def bench(config_path, out, progress, overwrite, executor, address, **overrides):
    """Run the whole comparison study: train, export, time, ensemble, predict, report.

    \b
    Re-running the same command resumes: members whose settings and data are unchanged are
    skipped. A member that runs out of memory is retried once at half the batch size; a member
    that fails is marked failed and the study goes on (exit status 1, report written).
    Example:
      kbench bench --config seed --data train.zip --test-data test.zip
    With --executor ray each backbone entry is a Ray task (one GPU each where there are GPUs);
    --out must then be on storage every Ray node sees (checked first).
    """
    opt.warn_if_gpu_unseen(overrides.get("backend"))
    study = kbench.bench(
        config_path,
        out=out,
        overwrite=overwrite,
        executor=executor,
        address=address,
        progress=progress,
        echo=opt.echo_err,
        command=opt.command_line(),
        **overrides,
    )
    show_study(study.record, study.out)


@click.command(cls=opt.Command)
@click.option("--out", type=click.Path(), default="reports/demo", show_default=True, help="Report folder.")
@opt.backend_option
@click.option("--images", type=int, default=600, show_default=True, help="Generated training images.")
@opt.flag("--fresh", "Start over instead of resuming an earlier demo in --out.")
def demo(out, images, fresh, backend):
    """Offline demo: the study pipeline (kbench's demo study) on generated Dogs-vs-Cats-style images.

    Generates train.zip, test.zip and answers.csv in Kaggle's layout, trains, exports, times and
    ensembles the demo's models from random weights, writes the report and scores the submission.
    """
    opt.warn_if_gpu_unseen(backend)
    study = kbench.demo(out, images=images, fresh=fresh, backend=backend, echo=opt.echo_err, command=opt.command_line())
    show_study(study.record, study.out)
