"""The one timing loop of kbench: warm-up calls outside the timings, every call timed on its own with
the device synchronised inside the timed region, interleaved rounds when variants are compared, and the
statistics of the individual timings as flat dict values.

Method as in timm's ``benchmark.py`` and nanoGPT's ``bench.py``. Every timing in kbench and in
``benchmarks/`` goes through ``time_calls`` (one thing timed) or ``interleaved`` (several, compared);
both take a ``clock`` so that tests can give them a fake one.

>>> calls = []
>>> timings = time_calls(lambda: calls.append(1), runs=3, warmup=2)
>>> len(calls), len(timings)
(5, 3)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def time_calls(
    call: Callable[[], object],
    runs: int,
    warmup: int = 0,
    sync: Callable[[], object] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    stop: Callable[[list[float]], bool] | None = None,
) -> list[float]:
    """Milliseconds of each of ``runs`` calls of ``call()``, after ``warmup`` untimed ones.

    ``sync`` (a device's ``synchronize``, ``block_until_ready``) runs after each call inside the timed
    region, so that a timing is the work's and not its dispatch's; after warm-up calls too, so that no
    warm-up work is still running when the first timing starts. ``stop(timings)``, asked after each
    timed call, ends the loop early: a time budget, a step too slow to repeat."""
    for _ in range(warmup):
        call()
        if sync is not None:
            sync()
    timings: list[float] = []
    for _ in range(runs):
        start = clock()
        call()
        if sync is not None:
            sync()
        timings.append((clock() - start) * 1000)
        if stop is not None and stop(timings):
            break
    return timings


def paired_order(names: list[str], rounds: int) -> list[list[str]]:
    """The order of the variants in each of ``rounds`` rounds. Rounds come in pairs: an order, then the
    same order reversed, the order rotated by one from pair to pair. In every pair each variant's mean
    position is the same, so a drift that is linear across a pair (the machine warming up, another
    process starting) reaches all variants alike; the rotation keeps one variant from always being
    first, next to the previous round's last.

    >>> paired_order(["a", "b", "c"], 4)
    [['a', 'b', 'c'], ['c', 'b', 'a'], ['b', 'c', 'a'], ['a', 'c', 'b']]
    """
    orders = []
    for index in range(rounds):
        shift = (index // 2) % len(names)
        order = names[shift:] + names[:shift]
        orders.append(order[::-1] if index % 2 else order)
    return orders


def interleaved(
    variants: dict,
    rounds: int,
    runs: int,
    warmup: int = 1,
    block_warmup: int = 1,
    open_block: Callable[[object], Callable[[], object]] | None = None,
    sync: Callable[[], object] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    min_rounds: int | None = None,
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """Milliseconds of each timed call of each variant (``name -> zero-argument callable``), the
    variants interleaved so that the machine's drift reaches them alike.

    First ``warmup`` untimed calls of each variant; then ``rounds`` rounds in ``paired_order``, each
    running every variant in a block: ``block_warmup`` untimed calls (they absorb what the previous
    block left behind: ONNX Runtime's spinning threads spin on for a while after a run returns, on the
    cores the next block needs), then ``runs`` timed ones (``time_calls``).

    ``open_block(value)``: the variants are then what it opens into a callable, once per block (and
    once for the first warm-up), and the callable is dropped after its block: a session opened for its
    turn, so that one at a time holds memory (``warmup=0`` then spares an opening per variant; the
    blocks' warm-up calls pay for each session's first allocations).

    With ``budget_s``: stop after a pair of rounds once ``min_rounds`` (default 2) are done and
    ``budget_s`` seconds have passed, or once ``3 * budget_s`` have; at most ``rounds``.
    ``rounds`` and ``min_rounds`` are even: the order is balanced over pairs of rounds only."""
    for count in (rounds, min_rounds or 2):
        if count < 2 or count % 2:
            raise ValueError(f"rounds come in pairs (an order, then its reverse); got {count}")

    def opened(name: str) -> Callable[[], object]:
        return variants[name] if open_block is None else open_block(variants[name])

    names = list(variants)
    timings: dict[str, list[float]] = {name: [] for name in names}
    for name in names if warmup else ():
        time_calls(opened(name), 0, warmup, sync)
    began = clock()
    for index, order in enumerate(paired_order(names, rounds)):
        for name in order:
            timings[name] += time_calls(opened(name), runs, block_warmup, sync, clock)
        done = index + 1
        if budget_s is not None and done % 2 == 0:
            spent = clock() - began
            if (done >= (min_rounds or 2) and spent >= budget_s) or spent >= 3 * budget_s:
                break
    return timings


def stats(milliseconds) -> dict[str, float]:
    """Summary of individually timed calls (milliseconds): min, median (p50), p90, p99, mean and
    standard deviation (of the population), as flat values for a row.

    >>> stats([1.0, 2.0, 3.0, 4.0])["p50_ms"]
    2.5
    """
    timings = np.asarray(milliseconds, dtype=np.float64)
    if timings.size == 0:
        raise ValueError("no timings")
    return {
        "min_ms": float(timings.min()),
        "p50_ms": float(np.percentile(timings, 50)),
        "p90_ms": float(np.percentile(timings, 90)),
        "p99_ms": float(np.percentile(timings, 99)),
        "mean_ms": float(timings.mean()),
        "std_ms": float(timings.std()),
    }


def medians(timings: dict[str, list[float]]) -> dict[str, float]:
    """Median milliseconds of each variant of ``interleaved``'s result."""
    return {name: float(np.median(values)) for name, values in timings.items()}
