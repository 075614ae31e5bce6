"""Which devices train, and how: data parallel over local accelerators (and hosts), mixed precision.

JAX: ``keras.distribution.DataParallel`` shards each global batch over the chosen devices; on
several hosts ``jax.distributed.initialize()`` first reads the cluster launcher's environment
(SLURM, Open MPI, or ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``).
TensorFlow: ``tf.distribute.MirroredStrategy`` over the chosen devices.
"""

from __future__ import annotations

import contextlib
import os

from kbench.errors import KbenchError

MIXED_POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def _cluster_environment() -> bool:
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _maybe_initialize_cluster() -> None:
    import keras

    if keras.backend.backend() != "jax" or not _cluster_environment():
        return
    import jax

    if jax.process_count() == 1:
        try:
            jax.distributed.initialize()  # arguments come from the launcher's environment
        except RuntimeError as error:  # already initialised by the user's own code
            if "already" not in str(error):
                raise


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

    _maybe_initialize_cluster()
    available = [str(d) for d in keras.distribution.list_devices()]
    count = count_devices(devices, len(available))
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
                keras.distribution.set_distribution(keras.distribution.DataParallel(devices=chosen))
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

    available = [str(d) for d in keras.distribution.list_devices()]
    count = count_devices(devices, len(available))
    if mixed_precision:
        if mixed_precision not in MIXED_POLICIES:
            raise KbenchError(f"--mixed-precision must be {' or '.join(MIXED_POLICIES)}")
        if all(d.lower().startswith("cpu") for d in available[:count]):
            raise KbenchError("--mixed-precision needs a GPU or TPU; on a CPU it only slows training down")
    if count > 1 and batch_size % count:
        raise KbenchError(f"--batch-size {batch_size} must be a multiple of the {count} devices (the global batch)")
