"""The ``kbench`` command line: each command parses its options, calls one library function and
prints what it returns (laid out by ``kbench.report``).

Keras reads its backend once, on first import: ``--backend`` is handled eagerly, before any command
body runs, and nothing here imports keras at module level. Option defaults are read from the
library's config dataclasses, never retyped here.
"""

from __future__ import annotations

import os
import sys

import click

from kbench import __version__
from kbench.ensemble import EnsembleConfig as _E  # the configs: options, help and defaults (no keras import)
from kbench.latency import LatencyConfig as _L
from kbench.submission import SubmissionConfig as _S
from kbench.options import Group, backend_option, overwrite_option, quiet_option, run, set_up_process
from kbench.options import from_config as _from
from kbench.train import TrainConfig as _T


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kbench")
@click.option("--debug", "debug_flag", is_flag=True, help="Show the full traceback of an unexpected error (or KBENCH_DEBUG=1).")
def cli(debug_flag):
    """Which pretrained backbone or ensemble should you fine-tune, and what does each cost to train
    and to serve? kbench measures it on your own images.

    Exit status: 0 done; 1 some stage failed (a study still writes its report); 2 bad input,
    refused before any work; 130/143 interrupted."""
    set_up_process(debug_flag)


@cli.command()
@click.argument("pattern", required=False)
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True)
def backbones(pattern, output_format):
    """List the registered backbones (native size, parameters, feature width)."""
    from kbench.backbones import list_backbones
    from kbench.report import backbone_text

    click.echo(backbone_text(list_backbones(), pattern, output_format))


@cli.command()
@_from(_T, "backbone", "data", defaults=False)
@backend_option
@_from(_T, "layout", "epochs", "batch_size", "image_size", "lr", "weights", "augment", "val_split", "seed",
       defaults=False)
@_from(_T, "run_dir", required=("run_dir",))
@_from(_T, "head_epochs", "train_bn", "bn_momentum", "schedule", "warmup_epochs", "weight_decay", "label_smoothing",
       "early_stopping", defaults=False)
@_from(_T, "freeze_backbone", "cache", "workers", "devices", "mixed_precision", defaults=False)
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --run-dir (its own settings).")
@overwrite_option
@quiet_option
def train(resume, quiet, run_dir, overwrite, **options):
    """Fine-tune one backbone on a folder or zip of images and write a run folder.

    \b
    Example:
      kbench train --backbone efficientnet_b0 --data train.zip --epochs 10 --run-dir runs/b0
    Ctrl-C saves a checkpoint; `--resume` continues it.
    """
    from kbench.report import train_summary
    from kbench.train import TrainConfig, resume_config
    from kbench.train import train as train_run

    given = {name: value for name, value in options.items() if value is not None}
    if resume:
        if overwrite:
            raise click.UsageError("--resume and --overwrite contradict each other")
        config = resume_config(run_dir, given)
    else:
        for required in ("backbone", "data"):
            if required not in given:
                raise click.UsageError(f"--{required} is required (unless --resume)")
        config = TrainConfig(run_dir=run_dir, **given)
    result = train_run(config, resume=resume, verbose=0 if quiet else "auto", overwrite=overwrite)
    click.echo(train_summary(result, run_dir))


@cli.group()
def export():
    """Export a trained model to another format."""


@export.command("onnx")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", type=click.Path(), help="ONNX file to write.  [default: exports/NAME.onnx]")
@backend_option
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (13..18).")
@click.option("--batch-size", default="dynamic", show_default=True, help="'dynamic' or a fixed batch size.")
@click.option("--quantize", type=click.Choice(["int8"]), help="Also write a statically quantized copy.")
@click.option("--calibration-data", type=click.Path(), help="Images to calibrate int8 on.  [default: the run's "
              "training split]")
def export_onnx_command(model, output, opset, batch_size, quantize, calibration_data, backend):
    """Export MODEL (a run folder, ensemble folder or .keras file) to ONNX, checked against Keras.

    \b
    The graph takes one input, `image` (float32 NHWC, RGB 0..255), and returns `probability`.
    It is kept only if ONNX Runtime matches Keras within 1e-4 at batch 1 and 3. A file already at
    the output made from the same model and options is reused.
    Example:
      kbench export onnx runs/b0 -o exports/b0.onnx --quantize int8
    """
    from kbench.export import ExportOptions, onnx_for
    from kbench.report import export_summary, quantize_summary

    result = onnx_for(model, output, ExportOptions.parse(opset, batch_size))
    click.echo(export_summary(result))
    if quantize:
        from kbench.quantize import int8_path, quantize_int8

        record = quantize_int8(result["path"], int8_path(result["path"]), calibration_data,
                               model if os.path.isdir(model) else None)
        click.echo(quantize_summary(record))


@cli.command()
@click.option("--members", required=True, help="Comma-separated run folders trained on the same data and split.")
@_from(_E, "data")
@backend_option
@_from(_E, "layout", "run_dir", "method", "epochs", "batch_size", "lr", "tta_passes", "seed", required=("run_dir",))
@overwrite_option
@quiet_option
def ensemble(members, run_dir, quiet, backend, overwrite, **options):
    """Combine trained runs into ONE model with one image input (members frozen).

    \b
    Example:
      kbench ensemble --members runs/b0,runs/b1 --run-dir runs/b0+b1
    """
    from kbench.ensemble import EnsembleConfig, train_ensemble
    from kbench.report import ensemble_summary

    config = EnsembleConfig([m.strip() for m in members.split(",") if m.strip()], run_dir, backend=backend, **options)
    result = train_ensemble(config, verbose=0 if quiet else "auto", overwrite=overwrite)
    click.echo(ensemble_summary(result, run_dir))


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--data", type=click.Path(), required=True, help="Test images: a folder or Kaggle's test.zip.")
@click.option("-o", "--output", type=click.Path(), default="submission.csv", show_default=True)
@backend_option
@_from(_S, "tta", "clip", "batch_size")
@click.option("--runtime", type=click.Choice(["keras", "onnxruntime"]), default="keras", show_default=True,
              help="Keras, or the model's checked ONNX export on ONNX Runtime.")
@click.option("--calibrate", is_flag=True, help="Apply a temperature fitted on the run's validation split.")
def predict(model, data, output, tta, clip, batch_size, runtime, calibrate, backend):
    """Predict a test set into a Kaggle submission (id,label = P(second class)).

    \b
    MODEL: a run or ensemble folder, a .keras file, or an .onnx file (ONNX Runtime only).
    Example:
      kbench predict runs/b0 --data test.zip -o submission.csv --tta flip --clip 0.005
    """
    from kbench.report import predict_summary
    from kbench.submission import predict_command

    result = predict_command(model, data, output, _S(tta, clip, batch_size), runtime, calibrate,
                             echo=lambda line: click.echo(line))
    click.echo(predict_summary(result))


@cli.command()
@click.argument("submission", type=click.Path())
@click.option("--answers", type=click.Path(), required=True, help="CSV with id,label (1 for the second class).")
def score(submission, answers):
    """Score a submission's log loss and accuracy as Kaggle does, after a grader's checks."""
    from kbench.submission import score_submission

    result = score_submission(submission, answers)
    click.echo(f"{submission}: log loss {result['log_loss']:.5f}, accuracy {result['accuracy']:.4f} "
               f"({result['rows']} rows)")


@cli.command()
@click.argument("models", nargs=-1, required=True)
@_from(_L, "runtimes")
@backend_option
@_from(_L, "batch_sizes", "runs", "warmup", "threads", "weights")
@click.option("--format", "output_format", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True, help="How the rows are written.")
@click.option("-o", "--output", type=click.Path(), help="Write the result here (after every row), not stdout.")
def latency(models, runtimes, batch_sizes, runs, warmup, threads, weights, output_format, output, backend):
    """Time inference of MODELS on Keras and ONNX Runtime (CPU and CUDA).

    \b
    MODEL: a run or ensemble folder, a .keras or .onnx file, or a backbone name (native size,
    fresh head). Keras models are exported to exports/NAME.onnx for the ONNX runtimes (reused
    while made from the same model). Ctrl-C prints the rows finished so far.
    Example:
      kbench latency efficientnet_b0 --runtime keras-compiled,onnxruntime-cpu --batch-size 1,32
    """
    from kbench.latency import LatencyConfig, machine_info, measure
    from kbench.report import latency_text

    config = LatencyConfig(list(models), runtimes, batch_sizes, runs, warmup, threads, weights)
    rows, interrupted = measure(config, output, output_format)
    if output:
        click.echo(f"wrote {len(rows)} rows to {output}", err=True)
    else:
        click.echo(latency_text(rows, output_format, machine_info(threads)))
    if interrupted:
        click.echo("kbench: interrupted; the rows above are those finished", err=True)
        sys.exit(130)


def _show_study(results: dict, out: str) -> None:
    from kbench.report import study_summary

    click.echo(study_summary(results, out))
    if results.get("failed"):
        sys.exit(1)


@cli.command()
@click.option("--config", "config_path", required=True, help="Study TOML, or a study kbench ships (seed, demo).")
@click.option("--data", type=click.Path(), help="Training images (overrides the config).")
@click.option("--test-data", type=click.Path(), help="Test images for the submission ('' for none).")
@click.option("--answers", type=click.Path(), help="id,label CSV to score the submission (overrides the config).")
@backend_option
@_from(_T, "layout", defaults=False)
@click.option("--out", type=click.Path(), help="Report folder.  [default: reports/NAME]")
@_from(_T, "devices", "mixed_precision", defaults=False)
@click.option("--progress/--quiet", default=False, help="Keras progress bars while training.")
@click.option("--overwrite", is_flag=True, help="Start over in an --out folder that holds another study.")
def bench(config_path, out, progress, overwrite, **overrides):
    """Run the whole comparison study: train, export, time, ensemble, predict, report.

    \b
    Re-running the same command resumes: members whose settings and data are unchanged are
    skipped. A member that runs out of memory is retried once at half the batch size; a member
    that fails is marked failed and the study goes on (exit status 1, report written).
    Example:
      kbench bench --config seed --data train.zip --test-data test.zip
    """
    from kbench.study import load_config, run_study

    config = load_config(config_path, **overrides)
    out = out or os.path.join("reports", config.name)
    results = run_study(config, out, command="kbench " + " ".join(sys.argv[1:]), verbose="auto" if progress else 0,
                        echo=lambda line: click.echo(line, err=True), overwrite=overwrite)
    _show_study(results, out)


@cli.command()
@click.option("--out", type=click.Path(), default="reports/demo", show_default=True, help="Report folder.")
@backend_option
@click.option("--images", type=int, default=600, show_default=True, help="Generated training images.")
@click.option("--fresh", is_flag=True, help="Start over instead of resuming an earlier demo in --out.")
def demo(out, images, fresh, backend):
    """Offline demo: the study pipeline (kbench's demo study) on generated Dogs-vs-Cats-style images.

    Generates train.zip, test.zip and answers.csv in Kaggle's layout, trains, exports, times and
    ensembles the demo's models from random weights, writes the report and scores the submission.
    """
    from kbench.study import run_demo

    results, out = run_demo(out, images, fresh, backend, echo=lambda line: click.echo(line, err=True),
                            command="kbench " + " ".join(sys.argv[1:]))
    _show_study(results, out)


@cli.command()
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True)
def doctor(output_format):
    """What kbench can use here: versions, the GPUs nvidia-smi lists, the devices JAX, TensorFlow
    and ONNX Runtime see (each asked in a subprocess), and a warning with the fix for an unused GPU."""
    import json

    from kbench.doctor import diagnose, format_doctor

    report = diagnose()
    click.echo(json.dumps(report, indent=2) if output_format == "json" else format_doctor(report))


def main() -> None:
    run(cli)
