"""The ``kbench`` command line: each command parses its options and calls one library function.

Keras reads its backend once, on first import: ``--backend`` is handled eagerly, before any command
body runs, and nothing here imports keras at module level.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys

import click

from kbench import __version__
from kbench.errors import KbenchError, TrainingInterrupted


class _Group(click.Group):
    """Turns KbenchError into one line on stderr and exit code 2 (130/143 for an interrupted run)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TrainingInterrupted as stopped:
            click.echo(f"kbench: {stopped}", err=True)
            ctx.exit(128 + stopped.signal_number)
        except KbenchError as error:
            click.echo(f"kbench: error: {error}", err=True)
            ctx.exit(2)


def _set_backend(ctx, param, value):
    from kbench.backend import use_backend

    try:
        return use_backend(value)
    except KbenchError as error:
        raise click.BadParameter(str(error)) from None


backend_option = click.option(
    "--backend",
    type=click.Choice(["jax", "tensorflow"]),
    default=None,
    is_eager=True,
    callback=_set_backend,
    help="Keras backend (default: $KERAS_BACKEND, else jax).",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kbench")
def cli():
    """Which pretrained backbone or ensemble should you fine-tune, and what does each cost to train
    and to serve? kbench measures it on your own images."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("kbench: %(levelname)s: %(message)s"))
    logger = logging.getLogger("kbench")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@cli.command()
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True)
def backbones(output_format):
    """List the registered backbones (native size, parameters, feature width)."""
    from kbench.backbones import list_backbones
    from kbench.report import format_table

    rows = [spec.to_dict() for spec in list_backbones()]
    if output_format == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    columns = ["name", "image_size", "params", "feature_dim", "preprocessing", "pretrained"]
    click.echo(format_table(rows, columns))


@cli.command()
@click.option("--backbone", help="Registered backbone name (see `kbench backbones`).")
@click.option("--data", type=click.Path(), help="Kaggle train folder or train.zip, or one folder per class.")
@backend_option
@click.option("--epochs", type=int, help="Training epochs.  [default: 10]")
@click.option("--batch-size", type=int, help="Images per step.  [default: 32]")
@click.option("--image-size", type=int, help="Pixels per side.  [default: the backbone's native size]")
@click.option("--lr", type=float, help="Adam learning rate.  [default: 1e-4]")
@click.option("--weights", help="imagenet, none, or a weights file (.keras, .weights.h5, backbone .h5).  "
              "[default: imagenet; none for small_cnn]")
@click.option("--augment/--no-augment", default=None, help="The reference study's flips and crops.  [default: on]")
@click.option("--val-split", type=float, help="Stratified hold-out fraction.  [default: 0.1]")
@click.option("--seed", type=int, help="Seed for the split, shuffling, augmentation and weights.  [default: 0]")
@click.option("--run-dir", type=click.Path(), required=True, help="Folder for the model, metrics and history.")
@click.option("--freeze-backbone", is_flag=True, default=None, help="Train only the head.")
@click.option("--cache", is_flag=True, default=None, help="Keep decoded images in memory after the first epoch.")
@click.option("--workers", type=int, help="Image decoding threads.  [default: CPU count, at most 8]")
@click.option("--devices", help="Data parallel over 'all' local devices or N of them.  [default: one]")
@click.option("--mixed-precision", type=click.Choice(["bfloat16", "float16"]), is_flag=False, flag_value="bfloat16",
              default=None, help="Mixed-precision compute on GPUs (float32 head and loss).  [flag alone: bfloat16]")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --run-dir (its own config).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(resume, quiet, run_dir, **options):
    """Fine-tune one backbone on a folder or zip of images and write a run folder.

    \b
    Example:
      kbench train --backbone efficientnet_b0 --data train.zip --epochs 10 --run-dir runs/b0
    Ctrl-C saves a checkpoint; `--resume` continues it.
    """
    from kbench.train import TrainConfig, resume_config
    from kbench.train import train as train_run

    given = {name: value for name, value in options.items() if value is not None}
    if resume:
        config = resume_config(run_dir, given.get("epochs"))
    else:
        for required in ("backbone", "data"):
            if required not in given:
                raise click.UsageError(f"--{required} is required (unless --resume)")
        config = TrainConfig(run_dir=run_dir, **given)
    result = train_run(config, resume=resume, verbose=0 if quiet else "auto")
    click.echo(_summary(result, run_dir))


def _summary(result: dict, run_dir: str) -> str:
    seconds = result["epoch_seconds"]
    quality = (
        f"val log loss {result['val_log_loss']:.4f}, accuracy {result['val_accuracy']:.3f}"
        if result["val_log_loss"] is not None
        else "no validation split"
    )
    return (
        f"{result['backbone']} ({result['backend']}): {quality}; {len(seconds)} epochs, "
        f"last {seconds[-1]:.1f} s ({result['train_images_per_second']:.0f} images/s) "
        f"-> {os.path.join(run_dir, 'model.keras')}"
    )


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
@click.option("--calibration-data", type=click.Path(), help="Images to calibrate int8 on.  [default: the run's training split]")
def export_onnx_command(model, output, opset, batch_size, quantize, calibration_data, backend):
    """Export MODEL (a run folder, ensemble folder or .keras file) to ONNX, checked against Keras.

    \b
    The graph takes one input, `image` (float32 NHWC, RGB 0..255), and returns `probability`.
    It is kept only if ONNX Runtime matches Keras within 1e-4 at batch 1 and 3.
    Example:
      kbench export onnx runs/b0 -o exports/b0.onnx --quantize int8
    """
    from kbench.export import default_output, export_onnx, run_metadata

    if batch_size == "dynamic":
        fixed = None
    elif batch_size.isdigit() and int(batch_size) > 0:
        fixed = int(batch_size)
    else:
        raise click.BadParameter("use 'dynamic' or a positive whole number", param_hint="--batch-size")
    output = output or default_output(model)
    result = export_onnx(model, output, opset=opset, batch_size=fixed, metadata=run_metadata(model))
    click.echo(
        f"wrote {result['path']} ({result['megabytes']:.1f} MB, opset {opset}, batch {result['batch_size']}) "
        f"in {result['export_seconds']:.1f} s; ONNX Runtime vs Keras ({result['backend']}): largest relative "
        f"difference {result['max_relative_difference']:.1e}"
    )
    if quantize:
        from kbench.quantize import quantize_int8

        int8_path = os.path.splitext(output)[0] + ".int8.onnx"
        record = quantize_int8(output, int8_path, calibration_data, model if os.path.isdir(model) else None)
        click.echo(
            f"wrote {int8_path} (calibrated on {record['calibration_images']} images); batch-1 latency "
            f"{record['float_ms']:.2f} ms -> {record['int8_ms']:.2f} ms ({record['speedup']:.2f}x)"
        )
        if "int8_val_log_loss" in record:
            click.echo(
                f"validation log loss {record['float_val_log_loss']:.4f} -> {record['int8_val_log_loss']:.4f}, "
                f"accuracy {record['float_val_accuracy']:.3f} -> {record['int8_val_accuracy']:.3f}"
            )


@cli.command()
@click.option("--members", required=True, help="Comma-separated run folders trained on the same data and split.")
@click.option("--data", type=click.Path(), help="The members' data.  [default: the path their runs recorded]")
@backend_option
@click.option("--run-dir", type=click.Path(), required=True, help="Folder for the ensemble.")
@click.option("--method", type=click.Choice(["stack", "mean"]), default="stack", show_default=True,
              help="stack: the study's head (Dense 32-8-1) on cached features; mean: average of probabilities.")
@click.option("--epochs", type=int, default=10, show_default=True, help="Head epochs (stack).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Head learning rate (Adam).")
@click.option("--tta-passes", type=int, default=0, show_default=True,
              help="Augmented passes of the training split added to the head's features.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def ensemble(members, run_dir, quiet, backend, **options):
    """Combine trained runs into ONE model with one image input (members frozen).

    \b
    Example:
      kbench ensemble --members runs/b0,runs/b1 --run-dir runs/b0+b1
    """
    from kbench.ensemble import EnsembleConfig, train_ensemble

    config = EnsembleConfig([m.strip() for m in members.split(",") if m.strip()], run_dir, backend=backend, **options)
    result = train_ensemble(config, verbose=0 if quiet else "auto")
    parts = ", ".join(f"{m['backbone']} {m['val_log_loss']:.4f}" for m in result["members"] if m["val_log_loss"] is not None)
    click.echo(
        f"ensemble ({result['method']}): val log loss {result['val_log_loss']:.4f}, accuracy "
        f"{result['val_accuracy']:.3f} (members: {parts}); features {result['feature_seconds']:.1f} s, "
        f"head {result['head_seconds']:.1f} s -> {os.path.join(run_dir, 'model.keras')}"
    )


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--data", type=click.Path(), required=True, help="Test images: a folder or Kaggle's test.zip.")
@click.option("-o", "--output", type=click.Path(), default="submission.csv", show_default=True)
@backend_option
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="flip: average with the horizontally flipped image.")
@click.option("--clip", type=float, help="Clip probabilities to [EPS, 1 - EPS].")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--runtime", type=click.Choice(["keras", "onnxruntime"]), default="keras", show_default=True)
@click.option("--calibrate", is_flag=True, help="Apply a temperature fitted on the run's validation split.")
def predict(model, data, output, tta, clip, batch_size, runtime, calibrate, backend):
    """Predict a test set into a Kaggle submission (id,label = P(second class)).

    \b
    MODEL: a run or ensemble folder, a .keras file, or an .onnx file (ONNX Runtime only).
    Example:
      kbench predict runs/b0 --data test.zip -o submission.csv --tta flip --clip 0.005
    """
    from kbench.submission import calibrate_temperature, predict_test_set

    temperature = None
    if calibrate:
        temperature, before, after = calibrate_temperature(model, runtime, batch_size)
        click.echo(f"calibration: temperature {temperature:.3f}; validation log loss {before:.4f} -> {after:.4f}")
    from kbench.data import find_images

    with click.progressbar(length=len(find_images(data, labelled=False)), label="predicting", file=sys.stderr) as bar:
        result = predict_test_set(model, data, output, tta, clip, batch_size, runtime, temperature,
                                  progress=bar.update)
    click.echo(f"wrote {result['path']}: {result['predicted']} of {result['images']} images predicted, "
               f"{result['skipped']} unreadable (given the uniform probability)")


@cli.command()
@click.argument("submission", type=click.Path())
@click.option("--answers", type=click.Path(), required=True, help="CSV with id,label (1 for the second class).")
def score(submission, answers):
    """Score a submission's log loss and accuracy as Kaggle does, after a grader's checks."""
    from kbench.submission import score_submission

    result = score_submission(submission, answers)
    click.echo(f"{submission}: log loss {result['log_loss']:.5f}, accuracy {result['accuracy']:.4f} "
               f"({result['rows']} rows)")


def _int_list(ctx, param, value):
    try:
        numbers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter("use comma-separated whole numbers, e.g. 1,8,32") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter("use comma-separated positive whole numbers, e.g. 1,8,32")
    return numbers


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--runtime", "runtimes", default="keras-predict,keras-compiled,onnxruntime-cpu,onnxruntime-cuda",
              show_default=True, help="Comma-separated runtimes to time.")
@backend_option
@click.option("--batch-size", "batch_sizes", default="1,8,32", show_default=True, callback=_int_list)
@click.option("--runs", type=int, default=100, show_default=True, help="Timed runs per row, each timed on its own.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs first.")
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads.  [default: ONNX Runtime's choice]")
@click.option("--weights", default="none", show_default=True, help="For registry names: imagenet or none.")
@click.option("--format", "output_format", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True)
@click.option("-o", "--output", type=click.Path(), help="Write the result here instead of stdout.")
def latency(models, runtimes, batch_sizes, runs, warmup, threads, weights, output_format, output, backend):
    """Time inference of MODELS on Keras and ONNX Runtime (CPU and CUDA).

    \b
    MODEL: a run or ensemble folder, a .keras or .onnx file, or a backbone name (native size,
    fresh head). Keras models are exported to exports/NAME.onnx for the ONNX runtimes (reused
    while newer than the model). Ctrl-C prints the rows finished so far.
    Example:
      kbench latency efficientnet_b0 --runtime keras-compiled,onnxruntime-cpu --batch-size 1,32
    """
    from kbench.latency import LatencyConfig, iter_latency, machine_info, plan

    config = LatencyConfig(list(models), [r.strip() for r in runtimes.split(",") if r.strip()], batch_sizes, runs,
                           warmup, threads, weights)
    from kbench.files import write_text
    from kbench.report import latency_text

    machine = machine_info(threads)
    rows, interrupted = [], False
    try:
        with click.progressbar(length=plan(config), label="timing", file=sys.stderr) as bar:
            for row in iter_latency(config):
                rows.append(row)
                bar.update(1)
                if output:  # keep what is finished even if the process is killed (out of memory, ...)
                    write_text(output, latency_text(rows, output_format, machine))
    except KeyboardInterrupt:
        interrupted = True
    text = latency_text(rows, output_format, machine)
    if output:
        write_text(output, text)
        click.echo(f"wrote {len(rows)} rows to {output}", err=True)
    else:
        click.echo(text)
    if interrupted:
        click.echo("kbench: interrupted; the rows above are those finished", err=True)
        sys.exit(130)


@cli.command()
@click.option("--config", "config_path", type=click.Path(), required=True, help="Study TOML (see benchmarks/).")
@click.option("--data", type=click.Path(), help="Training images (overrides the config).")
@click.option("--test-data", type=click.Path(), help="Test images for the submission (overrides the config).")
@click.option("--answers", type=click.Path(), help="id,label CSV to score the submission (overrides the config).")
@backend_option
@click.option("--out", type=click.Path(), help="Report folder.  [default: reports/NAME]")
@click.option("--devices", help="Train each member data-parallel over 'all' devices or N.")
@click.option("--mixed-precision", type=click.Choice(["bfloat16", "float16"]), is_flag=False, flag_value="bfloat16",
              default=None, help="Mixed-precision training on GPUs.")
@click.option("--progress/--quiet", default=False, help="Keras progress bars while training.")
def bench(config_path, data, test_data, answers, out, progress, devices, mixed_precision, backend):
    """Run the whole comparison study: train, export, time, ensemble, predict, report.

    \b
    Re-running the same command resumes: finished members are skipped. A member that fails is
    retried once at half the batch size, then marked failed, and the study goes on.
    Example:
      kbench bench --config benchmarks/seed.toml --data train.zip --test-data test.zip
    """
    from kbench.study import load_config

    config = load_config(config_path, data=data, test_data=test_data, answers=answers, backend=backend)
    config.train.update({k: v for k, v in (("devices", devices), ("mixed_precision", mixed_precision)) if v})
    _run_and_show(config, out or os.path.join("reports", config.name), progress)


def _run_and_show(config, out: str, progress: bool) -> dict:
    from kbench.report import flat_rows, format_table
    from kbench.study import run_study

    command = "kbench " + " ".join(sys.argv[1:])
    results = run_study(config, out, command=command, verbose="auto" if progress else 0,
                        echo=lambda line: click.echo(line, err=True))
    flat = flat_rows(results)
    click.echo("\nTime per training epoch")
    click.echo(format_table([r for r in flat if r["kind"] == "backbone"],
                            ["name", "status", "params", "image_size", "epoch_seconds", "train_images_per_second"]))
    latency_columns = [c for c in flat[0] if c.endswith("_p50_ms")] if flat else []
    click.echo("\nInference time (p50 ms; bN = batch size N)")
    short = [{"name": r["name"], **{c.replace("_p50_ms", "").replace("_b", " b"): r.get(c) for c in latency_columns}}
             for r in flat]
    click.echo(format_table(short))
    click.echo("\nLog loss")
    click.echo(format_table(flat, ["name", "kind", "status", "val_log_loss", "val_accuracy"]))
    submission = results.get("submission")
    if submission and "test_log_loss" in submission:
        click.echo(f"\nsubmission ({submission['model']}): test log loss {submission['test_log_loss']:.4f}, "
                   f"accuracy {submission['test_accuracy']:.3f}")
    click.echo(f"\nreport: {os.path.join(out, 'report.md')}\nresults: {os.path.join(out, 'results.csv')}, "
               f"{os.path.join(out, 'results.json')}\nplots: {os.path.join(out, 'logloss_vs_latency.png')}, "
               f"{os.path.join(out, 'epoch_time.png')}\nONNX files: {os.path.join(out, 'onnx')}/"
               + (f"\nsubmission: {submission['path']}" if submission else ""))
    return results


@cli.command()
@click.option("--out", type=click.Path(), default="reports/demo", show_default=True, help="Report folder.")
@backend_option
@click.option("--images", type=int, default=600, show_default=True, help="Generated training images.")
@click.option("--fresh", is_flag=True, help="Start over instead of resuming an earlier demo in --out.")
def demo(out, images, fresh, backend):
    """Offline demo: the study pipeline (benchmarks/demo.toml) on generated Dogs-vs-Cats-style images.

    Generates train.zip, test.zip and answers.csv in Kaggle's layout, trains, exports, times and
    ensembles the demo's models from random weights, writes the report and scores the submission.
    """
    from kbench.study import load_config
    from kbench.synthetic import write_kaggle_dataset

    config_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "demo.toml")
    if not os.path.isfile(config_path):
        raise KbenchError(f"the demo config is missing: {config_path} (run kbench from a clone of the repository)")
    if fresh and os.path.isdir(out):
        shutil.rmtree(out)
    data_dir = os.path.join(out, "data")
    if not os.path.isfile(os.path.join(data_dir, "answers.csv")):
        click.echo(f"writing {images} generated training images (Kaggle layout) to {data_dir}/", err=True)
        write_kaggle_dataset(data_dir, n_train=images, n_test=120, image_size=64)
    paths = {"data": "train.zip", "test_data": "test.zip", "answers": "answers.csv"}
    config = load_config(config_path, backend=backend,
                         **{key: os.path.abspath(os.path.join(data_dir, name)) for key, name in paths.items()})
    _run_and_show(config, out, progress=False)


@cli.command()
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True)
def doctor(output_format):
    """What kbench can use here: versions, the GPUs nvidia-smi lists, the devices JAX, TensorFlow
    and ONNX Runtime see (each asked in a subprocess), and a warning with the fix for an unused GPU."""
    from kbench.doctor import diagnose, format_doctor

    report = diagnose()
    click.echo(json.dumps(report, indent=2) if output_format == "json" else format_doctor(report))


def main() -> None:
    cli(prog_name="kbench")
