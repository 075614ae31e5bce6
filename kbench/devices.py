"""Which devices train, and how: data parallel over local accelerators (and hosts), mixed precision.

JAX: ``keras.distribution.DataParallel`` shards each global batch over the chosen devices; with
several processes (``kbench.distributed``: ``kbench launch``, SLURM, Kubernetes) JAX joins them
first, ``--devices all`` spans every process's devices and each process feeds only its own part of
each batch. TensorFlow: ``tf.distribute.MirroredStrategy`` over one process's devices.
"""

from __future__ import annotations

import contextlib

from kbench.errors import KbenchError

MIXED_POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def _join_cluster() -> int:
    """Join the processes the environment names (before JAX starts); returns how many there are."""
    import keras

    from kbench import distributed

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
    if mixed_precision:
        if mixed_precision not in MIXED_POLICIES:
            raise KbenchError(f"--mixed-precision must be {' or '.join(MIXED_POLICIES)}")
        if all(d.lower().startswith("cpu") for d in chosen):
            raise KbenchError("--mixed-precision needs a GPU or TPU; on a CPU it only slows training down")
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
                # several processes: each feeds its own part of every batch (kbench.data's shard)
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


def check_devices(devices: str | int | None, batch_size: int, mixed_precision: str | None) -> None:
    """The checks ``training_devices`` makes, without setting anything up: for validating a study
    before its first member trains."""
    import keras

    processes = _join_cluster()
    available = [str(d) for d in keras.distribution.list_devices()]
    count = _count(devices, len(available), processes)
    if mixed_precision:
        if mixed_precision not in MIXED_POLICIES:
            raise KbenchError(f"--mixed-precision must be {' or '.join(MIXED_POLICIES)}")
        if all(d.lower().startswith("cpu") for d in available[:count]):
            raise KbenchError("--mixed-precision needs a GPU or TPU; on a CPU it only slows training down")
    if count > 1 and batch_size % count:
        raise KbenchError(f"--batch-size {batch_size} must be a multiple of the {count} devices (the global batch)")


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
