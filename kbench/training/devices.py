"""Which devices train, and how: data parallel over local accelerators (and hosts), mixed precision.

JAX: ``keras.distribution.DataParallel`` shards each global batch over the chosen devices; with
several processes (``kbench.training.distributed``: ``kbench launch``, SLURM, Kubernetes) JAX joins them
first, ``--devices all`` spans every process's devices and each process feeds only its own part of
each batch. TensorFlow: ``tf.distribute.MirroredStrategy`` over one process's devices.

Mixed precision runs on GPUs and TPUs, and in bfloat16 on CPUs that compute it natively (AMX-BF16 or
AVX512-BF16); whether that pays depends on the backbone's family (``CPU_BF16_MEASURED``).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

from kbench.core import machine
from kbench.core.errors import KbenchError

MIXED_POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
CPU_BF16_PAGE = "benchmarks/docs/cpu-bf16.md"


class Bf16Measurement(NamedTuple):
    """One training step timed in bfloat16 and in float32 on a CPU with AMX-BF16."""

    speedup: float  # float32's step time over bfloat16's: above 1 is faster
    backbone: str
    batch_size: int
    image_size: int


# What --mixed-precision bfloat16 did to a training step on a CPU, by family (the backbone spec's
# keras.applications module; the name of kbench's own models) and backend. Recorded, with how and on
# what machine, in CPU_BF16_PAGE: under TensorFlow AMX speeds up dense convolutions but depthwise layers
# gain nothing and pay the casts; under JAX even a plain CNN was slower.
CPU_BF16_MEASURED = {
    ("resnet", "tensorflow"): Bf16Measurement(1.33, "resnet50", 16, 224),
    ("efficientnet", "tensorflow"): Bf16Measurement(0.68, "efficientnet_b0", 16, 224),
    ("mobilenet_v2", "tensorflow"): Bf16Measurement(0.78, "mobilenet_v2", 16, 224),
    ("small_cnn", "tensorflow"): Bf16Measurement(1.31, "small_cnn", 16, 64),
    ("small_cnn", "jax"): Bf16Measurement(0.45, "small_cnn", 16, 64),
}


def _join_cluster() -> int:
    """Join the processes the environment names (before JAX starts); returns how many there are."""
    import keras

    from kbench.training import distributed

    distributed.initialize(keras.backend.backend())
    return distributed.process_count()


def count_devices(devices: str | int | None, available: int) -> int:
    """``--devices``: "all", a positive number, or None (one device)."""
    if devices in (None, "", 1, "1"):
        return 1
    if devices == "all":
        return available
    try:
        wanted = int(devices)
    except (TypeError, ValueError):
        raise KbenchError(f"--devices must be 'all' or a positive number; got {devices!r}") from None
    if wanted < 1:
        raise KbenchError(f"--devices must be 'all' or a positive number; got {devices!r}")
    if wanted > available:
        raise KbenchError(f"--devices {wanted}: only {available} device(s) are visible")
    return wanted


@contextlib.contextmanager
def training_devices(devices: str | int | None, batch_size: int, mixed_precision: str | None):
    """Set up data parallelism and the dtype policy for the block; yields the devices used.

    The global batch is ``batch_size`` and must split evenly over the devices. Restores keras'
    previous distribution and dtype policy afterwards.
    """
    import keras

    processes = _join_cluster()
    available = [str(d) for d in keras.distribution.list_devices()]
    count = _count(devices, len(available), processes)
    chosen = available[:count]
    _check_precision(mixed_precision, chosen)
    if count > 1 and batch_size % count:
        raise KbenchError(f"--batch-size {batch_size} must be a multiple of the {count} devices (the global batch)")
    previous_policy = keras.mixed_precision.dtype_policy()
    previous_distribution = keras.distribution.distribution()
    scope = contextlib.nullcontext()
    try:
        if mixed_precision:
            keras.mixed_precision.set_global_policy(MIXED_POLICIES[mixed_precision])
        if count > 1:
            if keras.backend.backend() == "jax":
                # several processes: each feeds its own part of every batch (kbench.data.dataset's shard)
                keras.distribution.set_distribution(
                    keras.distribution.DataParallel(devices=chosen, auto_shard_dataset=processes == 1)
                )
            else:
                import tensorflow as tf

                scope = tf.distribute.MirroredStrategy(devices=[f"/{d}" for d in chosen]).scope()
        with scope:
            yield chosen
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        keras.distribution.set_distribution(previous_distribution)


def check_devices(
    devices: str | int | None, batch_size: int, mixed_precision: str | None, backbone: str | None = None
) -> str | None:
    """The checks ``training_devices`` makes, without setting anything up: for validating a run or a
    study before anything is written. Returns what to expect of bfloat16 on a CPU for ``backbone``
    (one line for the log), else None."""
    import keras

    processes = _join_cluster()
    available = [str(d) for d in keras.distribution.list_devices()]
    count = _count(devices, len(available), processes)
    on_cpu = _check_precision(mixed_precision, available[:count])
    if count > 1 and batch_size % count:
        raise KbenchError(f"--batch-size {batch_size} must be a multiple of the {count} devices (the global batch)")
    return cpu_bf16_expectation(backbone, keras.backend.backend()) if on_cpu and backbone else None


def _check_precision(mixed_precision: str | None, chosen: list[str]) -> bool:
    """Refuses a mixed precision these devices can't run faster; True when bfloat16 runs on a CPU."""
    if not mixed_precision:
        return False
    if mixed_precision not in MIXED_POLICIES:
        raise KbenchError(f"--mixed-precision must be {' or '.join(MIXED_POLICIES)}")
    if not all(d.lower().startswith("cpu") for d in chosen):
        return False
    if mixed_precision != "bfloat16":
        raise KbenchError(
            f"--mixed-precision {mixed_precision} needs a GPU or TPU; on a CPU it only slows training down "
            "(bfloat16 runs on CPUs with AMX-BF16 or AVX512-BF16)"
        )
    if not machine.has_native_bf16():
        raise KbenchError(
            "--mixed-precision bfloat16 on a CPU needs AMX-BF16 or AVX512-BF16, which this CPU lacks "
            f"({machine.cpu().model or 'unknown model'}): emulated, it only slows training down"
        )
    return True


def cpu_bf16_expectation(backbone: str, backend: str) -> str:
    """What --mixed-precision bfloat16 was measured to do to ``backbone``'s family on a CPU under
    ``backend`` (else under another backend), in one line.

    >>> cpu_bf16_expectation("resnet101", "tensorflow").split(" (")[0]
    "bfloat16 on a CPU: the resnet family measured at 1.33x float32's training speed under tensorflow"
    """
    from kbench.models.backbones import get_backbone

    spec = get_backbone(backbone)
    family = spec.module or spec.name
    measured = {other: m for (name, other), m in CPU_BF16_MEASURED.items() if name == family}
    if not measured:
        return f"bfloat16 on a CPU: the {family} family is not measured on a CPU; see {CPU_BF16_PAGE}"
    where = backend if backend in measured else next(iter(measured))
    m = measured[where]
    speed = (
        f"{m.speedup:.2f}x float32's training speed under {where} ({'faster' if m.speedup > 1 else 'slower'}; "
        f"{m.backbone}, batch {m.batch_size} at {m.image_size} px, on a Xeon with AMX)"
    )
    if where == backend:
        return f"bfloat16 on a CPU: the {family} family measured at {speed}; see {CPU_BF16_PAGE}"
    return f"bfloat16 on a CPU: the {family} family is not measured under {backend}; {speed}; see {CPU_BF16_PAGE}"


def _count(devices: str | int | None, available: int, processes: int) -> int:
    count = count_devices(devices, available)
    if processes > 1 and count != available:
        raise KbenchError(
            f"--devices {devices or 1}: with {processes} processes training together, use --devices all "
            f"(their {available} devices)"
        )
    return count


def process_local_values(model):
    """While held, every variable of ``model`` (and its optimizer) holds this process's replica
    instead of the array spanning all processes, and keras has no distribution: what saving or
    predicting in one process needs (a spanning array, or one put across all processes, would wait
    for the others). A no-op for one process.

    Keras has no public way to swap a variable's array without redistributing it, hence
    ``Variable._value`` and ``Variable._layout`` (keras 3.15's JAX variables)."""
    import keras

    if keras.backend.backend() != "jax":
        return contextlib.nullcontext()
    import jax

    if jax.process_count() == 1:
        return contextlib.nullcontext()
    return _swapped(model)


@contextlib.contextmanager
def _swapped(model):
    import jax
    import keras

    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(None)  # else saving puts arrays back across all processes
    variables = list(model.variables) + (list(model.optimizer.variables) if model.optimizer else [])
    swapped = []
    try:
        for variable in variables:
            value = variable._value
            if isinstance(value, jax.Array) and not value.is_fully_addressable:
                if not value.is_fully_replicated:
                    raise KbenchError(f"variable {variable.path} is split across processes; can't save it from one")
                swapped.append((variable, value, variable._layout))
                variable._value, variable._layout = value.addressable_data(0), None  # assign keeps it local
        yield
    finally:
        for variable, value, layout in swapped:
            variable._value, variable._layout = value, layout
        keras.distribution.set_distribution(previous)
