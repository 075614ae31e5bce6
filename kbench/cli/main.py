"""The ``kbench`` command line: each command parses its options, calls one library function and
prints what it returns (worded by ``kbench.cli.summaries``).

Keras reads its backend once, on first import: ``--backend`` is handled eagerly, before any command
body runs, and nothing here imports keras at module level. Option defaults are read from the
library's config dataclasses, never retyped here.
"""

from __future__ import annotations

import signal
import sys

import click

import kbench
from kbench.cli import options as opt
from kbench.cli.study import bench, demo, show_study
from kbench.core.errors import STOP_REQUESTS, KbenchError
from kbench.core.version import __version__
from kbench.export.onnx import DEFAULT_EXPORT_DIR as _EXPORT_DIR
from kbench.export.onnx import OPSETS as _OPSETS
from kbench.export.onnx import ExportOptions as _X1
from kbench.report import compare as comparison
from kbench.serving.latency import LatencyConfig as _L
from kbench.serving.runtimes import RUNTIMES
from kbench.serving.submission import PREDICT_RUNTIMES
from kbench.serving.submission import SubmissionConfig as _S
from kbench.training.config import TrainConfig as _T
from kbench.training.ensemble import EnsembleConfig as _E  # the configs: options, help and defaults (no keras import)
from kbench.training.launch import LaunchConfig as _D


@click.group(cls=opt.Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kbench")
@opt.flag("--debug", "Show the full traceback of an unexpected error (or KBENCH_DEBUG=1).", "debug_flag")
@click.option("-v", "--verbose", "verbose_flag", is_flag=True, help="Show other libraries' start-up lines too.")
def cli(debug_flag, verbose_flag):
    """Which pretrained backbone or ensemble should you fine-tune, and what does each cost to train
    and to serve? kbench measures it on your own images.

    Exit status: 0 done; 1 some stage failed (a study still writes its report); 2 bad input,
    refused before any work; 130/143 interrupted."""
    opt.set_up_process(debug_flag, verbose_flag)


@cli.command()
@click.argument("pattern", required=False)
@opt.format_option("table", "json")
def backbones(pattern, output_format):
    """List the registered backbones: native and minimum image size, parameters and GFLOPs of the
    headless backbone at its native size, feature width, preprocessing. PATTERN filters names with
    shell wildcards: kbench backbones 'efficientnet_v2*'."""
    from kbench.cli.summaries import backbone_text

    specs = kbench.list_backbones(pattern)
    if not specs:
        raise KbenchError(f"no backbone matches {pattern!r}; kbench backbones lists them all")
    click.echo(backbone_text(specs, output_format))


@cli.command()
@opt.from_config(_T, "backbone", "data", defaults=False)
@opt.backend_option
@opt.from_config(_T, "layout epochs batch_size image_size lr weights augment val_split seed", defaults=False)
@opt.from_config(_T, "run_dir", required=("run_dir",))
@opt.from_config(_T, "head_epochs train_bn bn_momentum schedule warmup_epochs weight_decay", defaults=False)
@opt.from_config(_T, "label_smoothing early_stopping freeze_backbone cache workers devices", defaults=False)
@opt.from_config(_T, "mixed_precision", defaults=False)
@opt.flag("--resume", "Continue the interrupted run in --run-dir (its own settings).")
@opt.overwrite_option
@opt.quiet_option
def train(resume, quiet, run_dir, overwrite, **options):
    """Fine-tune one backbone on a folder or zip of images and write a run folder.

    \b
    Example:
      kbench train --backbone efficientnet_b0 --data train.zip --epochs 10 --run-dir runs/b0
    Ctrl-C stops it; `--resume` continues it, redoing the interrupted epoch from its start.
    """
    from kbench.cli.summaries import train_summary

    given = {name: value for name, value in options.items() if value is not None}
    if resume:
        if overwrite:
            raise click.UsageError("--resume and --overwrite contradict each other")
        if click.get_current_context().get_parameter_source("backend") != click.core.ParameterSource.COMMANDLINE:
            given.pop("backend", None)  # the machine's default, not asked for: the run's own applies
    else:
        for required in ("backbone", "data"):
            if required not in given:
                raise click.UsageError(f"--{required} is required (unless --resume)")
    opt.warn_if_gpu_unseen(given.get("backend"))
    result = kbench.train(run_dir=run_dir, resume=resume, overwrite=overwrite, quiet=quiet, **given)
    if isinstance(result, dict):  # one of several processes training together; process 0 reports
        click.echo(f"process {result['process']} of {result['processes']}: done; process 0 wrote {run_dir}")
    else:
        click.echo(train_summary(result.metrics, run_dir))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@opt.from_config(_D, "processes", "port", "log_dir")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def launch(processes, port, log_dir, command):
    """Start N processes of COMMAND on this machine that train as one (JAX).

    \b
    Each gets JAX_COORDINATOR_ADDRESS (127.0.0.1:PORT), JAX_NUM_PROCESSES and its own
    JAX_PROCESS_ID, the variables the SLURM and Kubernetes examples in docs/backends-and-devices.md set. Output is
    prefixed by rank; when one process fails the others are stopped, and the exit status is
    the first failure's. Ctrl-C reaches every process once.
    Example:
      kbench launch --processes 2 -- kbench train --backbone small_cnn --data train.zip \\
        --devices all --run-dir runs/mp --backend jax
    """
    from kbench.training.launch import LaunchConfig
    from kbench.training.launch import launch as launch_processes

    code = launch_processes(LaunchConfig(processes, port, log_dir), list(command), echo=click.echo)
    sys.exit(code)


@cli.group()
def export():
    """Export a trained model to another format."""


@export.command("onnx")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", type=click.Path(), help=f"ONNX file to write.  [default: {_EXPORT_DIR}/NAME.onnx]")
@opt.backend_option
@click.option(
    "--opset", type=int, default=_X1.opset, show_default=True, help=f"ONNX opset ({_OPSETS.start}..{_OPSETS.stop - 1})."
)
@click.option("--batch-size", default="dynamic", show_default=True, help="'dynamic' or a fixed batch size.")
@click.option("--quantize", type=click.Choice(["int8"]), help="Also write a statically quantized copy.")
@click.option("--calibration-data", type=click.Path(), help="Images to calibrate int8 on.  [default: training split]")
@click.option(
    "--graph-passes/--no-graph-passes",
    default=_X1.graph_passes,
    show_default=True,
    help="Clean the converted graph before the parity check: kbench.export.graph's passes (fold_input_affine, "
    "read_input_channels_last, drop_dead_nodes), then onnxslim. --no-graph-passes keeps tf2onnx's graph as "
    "written.",
)
def export_onnx_command(model, output, opset, batch_size, quantize, calibration_data, backend, graph_passes):
    """Export MODEL (a run folder, ensemble folder or .keras file) to ONNX, checked against Keras.

    \b
    The graph takes one input, `image` (float32 NHWC, RGB 0..255), and returns `probability`.
    It is kept only if ONNX Runtime matches Keras within 1e-4 at batch 1 and 3. A file already at
    the output made from the same model and options is reused.
    Example:
      kbench export onnx runs/b0 -o exports/b0.onnx --quantize int8
    """
    from kbench.cli.summaries import export_summary, quantize_summary

    exported = kbench.export_onnx(
        model,
        output,
        opset=opset,
        batch_size=batch_size,
        graph_passes=graph_passes,
        quantize=quantize,
        calibration_data=calibration_data,
    )
    click.echo(export_summary(exported.record))
    if quantize:
        click.echo(quantize_summary(exported.record["quantize"]))


@cli.command()
@click.option("--members", required=True, help="Comma-separated run folders trained on the same data and split.")
@opt.from_config(_E, "data")
@opt.backend_option
@opt.from_config(
    _E, "layout", "run_dir", "method", "epochs", "batch_size", "lr", "tta_passes", "seed", required=("run_dir",)
)
@opt.overwrite_option
@opt.quiet_option
def ensemble(members, run_dir, quiet, backend, overwrite, **options):
    """Combine trained runs into ONE model with one image input (members frozen).

    \b
    Example:
      kbench ensemble --members runs/b0,runs/b1 --run-dir runs/b0+b1
    """
    from kbench.cli.summaries import ensemble_summary

    listed = [m.strip() for m in members.split(",") if m.strip()]
    run = kbench.ensemble(listed, run_dir, backend=backend, overwrite=overwrite, quiet=quiet, **options)
    click.echo(ensemble_summary(run.metrics, run_dir))


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--data", type=click.Path(), required=True, help="Test images: a folder or Kaggle's test.zip.")
@click.option("-o", "--output", type=click.Path(), default="submission.csv", show_default=True)
@opt.backend_option
@opt.from_config(_S, "tta", "clip", "batch_size")
@click.option(
    "--runtime",
    type=click.Choice(list(PREDICT_RUNTIMES)),
    default="keras",
    show_default=True,
    help="Keras, or the checked ONNX export on ONNX Runtime or OpenVINO (f32, bf16).",
)
@opt.flag("--calibrate", "Apply a temperature fitted on the run's validation split.")
def predict(model, data, output, tta, clip, batch_size, runtime, calibrate, backend):
    """Predict a test set into a Kaggle submission (id,label = P(second class)).

    \b
    MODEL: a run or ensemble folder, a .keras file, or an .onnx file (ONNX Runtime or OpenVINO).
    Example:
      kbench predict runs/b0 --data test.zip -o submission.csv --tta flip --clip 0.005
    """
    from kbench.cli.summaries import predict_summary

    with opt.ProgressBar("predicting") as bar:
        result = kbench.predict(
            model,
            data,
            output,
            tta=tta,
            clip=clip,
            batch_size=batch_size,
            runtime=runtime,
            calibrate=calibrate,
            progress=bar,
            echo=click.echo,
        )
    click.echo(predict_summary(result))


@cli.command()
@click.argument("submission", type=click.Path())
@click.option("--answers", type=click.Path(), required=True, help="CSV with id,label (1 for the second class).")
def score(submission, answers):
    """Score a submission's log loss and accuracy as Kaggle does, after a grader's checks."""
    from kbench.cli.summaries import score_summary

    click.echo(score_summary(submission, kbench.score(submission, answers)))


@cli.command(
    help=f"""Time inference of MODELS on Keras, ONNX Runtime (CPU, CUDA) and OpenVINO (CPU).

    \b
    Runtimes: {", ".join(RUNTIMES)}.
    MODEL: a run or ensemble folder, a .keras or .onnx file, or a backbone name (native size,
    fresh head). Keras models are exported to exports/NAME.onnx for the ONNX runtimes (reused
    while made from the same model). Ctrl-C prints the rows finished so far.
    Example:
      kbench latency efficientnet_b0 --runtime onnxruntime-cpu,openvino-cpu,openvino-cpu-bf16 --batch-size 1,32
    """
)
@click.argument("models", nargs=-1, required=True)
@opt.from_config(_L, "runtimes")
@opt.backend_option
@opt.from_config(_L, "batch_sizes", "runs", "warmup", "threads", "weights", "tune")
@opt.format_option("table", "markdown", "csv", "json")
@click.option("-o", "--output", type=click.Path(), help="Write the result here (after every row), not stdout.")
def latency(models, runtimes, batch_sizes, runs, warmup, threads, weights, tune, output_format, output, backend):
    # its help is the command's help= above: it names the registered runtimes (kbench.serving.runtimes)
    from kbench.core.machine import facts
    from kbench.core.tables import latency_text

    opt.warn_if_gpu_unseen(backend)
    with opt.ProgressBar("timing") as bar:
        rows = kbench.latency(
            list(models),
            runtimes=runtimes,
            batch_sizes=batch_sizes,
            runs=runs,
            warmup=warmup,
            threads=threads,
            weights=weights,
            tune=tune,
            output=output,
            output_format=output_format,
            progress=bar,
        )
    if output:
        click.echo(f"wrote {len(rows)} rows to {output}", err=True)
    else:
        click.echo(latency_text(rows, output_format, facts(threads)))
    if rows.interrupted:  # 130 for Ctrl-C, 143 for SIGTERM, as every other command
        finished = f"the rows in {output}" if output else "the rows above"
        click.echo(f"kbench: interrupted; {finished} are those finished", err=True)
        sys.exit(128 + (STOP_REQUESTS[0] if STOP_REQUESTS else signal.SIGINT))


@cli.command()
@opt.format_option("table", "json")
def doctor(output_format):
    """What kbench can use here: versions, the GPUs nvidia-smi lists, the devices JAX, TensorFlow
    and ONNX Runtime see (each asked in a subprocess), and a warning with the fix for an unused GPU."""
    import json

    from kbench.cli.doctor import diagnose, format_doctor

    report = diagnose()
    click.echo(json.dumps(report, indent=2) if output_format == "json" else format_doctor(report))


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(), default=comparison.DEFAULT_OUT, show_default=True, help="Report folder.")
def compare(runs, out):
    """Compare finished runs and ensembles trained outside a study: a study's tables and plots."""
    show_study(kbench.compare(list(runs), out, command=opt.command_line()).record, out)


cli.add_command(bench)
cli.add_command(demo)


def main() -> None:
    opt.run(cli)
