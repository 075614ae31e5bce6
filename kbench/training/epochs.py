"""What happens around each epoch's ``fit`` in ``kbench.training.train``: the epoch clock and the
progress bar (Keras callbacks), and stop requests: the first SIGINT/SIGTERM asks every process
training together to stop after the same batch.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import numpy as np

from kbench.core.errors import STOP_REQUESTS, KbenchError
from kbench.training import distributed
from kbench.training.config import TrainConfig

log = logging.getLogger("kbench")


def epoch_callbacks(config: TrainConfig, history: list[dict], stop, verbose) -> tuple:
    """The epoch clock (``.seconds``: the last epoch's, validation not counted) and the callbacks
    each ``fit`` gets: the clock, and a progress bar unless ``verbose`` is 0."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        # Reads no value of a step on the training thread: under JAX with one process, Keras then
        # dispatches the batch callbacks to its own threads (which wait for each step's logs) and the
        # steps run back to back, one device sync per epoch. Several processes agree on a stop after
        # every batch (a collective): in order, on the training thread. The epoch's time ends when the
        # last step's logs were ready (validation not counted).
        #
        # Never `self.model` here: under JAX that property copies the training state into the model
        # (keras' Callback.model calls jax_state_sync). From Keras' callback thread it races with the
        # loop: the model gets buffers the next step was already given (donated), the loop's own sync
        # is skipped, and the epoch ends in "Buffer has been deleted or donated". `self.trained` is
        # the model without that copy.
        def __init__(self):
            super().__init__()
            self.async_safe = distributed.process_count() == 1

        def set_model(self, model):
            super().set_model(model)
            self.trained = model

        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.finished, self.seconds = time.perf_counter(), None, None
            self.lock = threading.Lock()

        def on_train_batch_end(self, batch, logs=None):
            with self.lock:
                self.finished = max(self.finished or 0.0, time.perf_counter())
            if stop.agreed() is not None:
                if distributed.process_count() > 1:
                    raise AgreedStop  # every process after this same batch, none validating alone
                self.trained.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = (self.finished or time.perf_counter()) - self.start
            loss = (logs or {}).get("loss")
            if loss is not None and not np.isfinite(float(loss)):
                raise KbenchError(
                    f"training diverged: the loss is {float(loss)} in epoch {len(history) + 1}; "
                    f"lower --lr (now {config.lr})"
                )

    class Progress(keras.callbacks.ProgbarLogger):
        # Its updates come from Keras' callback threads under JAX: one at a time, never backwards.
        async_safe = True

        def set_params(self, params):
            super().set_params(params)
            self.epochs = config.epochs  # one fit per epoch: show the run's total, not 1
            self.lock, self.shown = threading.Lock(), -1

        def on_train_batch_end(self, batch, logs=None):
            with self.lock:
                if batch > self.shown:
                    self.shown = batch
                    super().on_train_batch_end(batch, logs)

        def on_epoch_begin(self, epoch, logs=None):
            self.shown = -1
            super().on_epoch_begin(epoch, logs)

    clock = EpochClock()
    return clock, [clock] + ([Progress()] if verbose else [])


class AgreedStop(Exception):
    """Every process training together stops after the same batch (``StopRequest.agreed``)."""


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to stop at the end of a batch (under JAX with one
    process, the steps already dispatched finish first: a batch or two); a second SIGINT aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def _handle(self, signal_number, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal_number
        log.warning("stopping after a batch; --resume redoes this epoch from its start (Ctrl-C again: at once)")

    def agreed(self) -> int | None:
        """The stop request: this process's, or where several train as one, any process's, so that
        all stop after the same batch (one that stopped alone would leave the others waiting in a
        collective). An all-gather there: call it on every process at the same points.

        The answer is the gathered value, never ``self.signal`` read again after the gather: a signal
        that lands on one process during the gather would make that process alone stop here, and the
        others' next collective would meet a different one. It counts at the next call instead."""
        requested = distributed.largest_everywhere(self.signal or 0)
        if requested and self.signal is None:
            self.signal = requested
        return requested or None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        if STOP_REQUESTS:  # asked before training began (its KeyboardInterrupt may have been swallowed)
            self.signal = STOP_REQUESTS[0]
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False
