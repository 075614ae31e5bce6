"""The one timing loop of kbench: warm-up calls outside the timings, every call timed on its own with
the device synchronised inside the timed region, interleaved rounds when variants are compared, and the
statistics of the individual timings as flat dict values.

Method as in timm's ``benchmark.py`` and nanoGPT's ``bench.py``. Every timing of calls in kbench goes
through ``time_calls`` (one thing timed) or ``interleaved`` (several, compared); both take a ``clock`` so
that tests can give them a fake one. The input pipeline's throughput (one pass of a loader, not calls)
is ``kbench.data.loader.loader_throughput``; the training benchmarks time epochs as ``kbench train``
does. ``watch_load`` says whether other processes were busy on the cores timed on meanwhile, as pyperf
checks a benchmark's machine.

>>> calls = []
>>> timings = time_calls(lambda: calls.append(1), runs=3, warmup=2)
>>> len(calls), len(timings)
(5, 3)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

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


@dataclass(frozen=True)
class Plan:
    """How variants are timed against each other (``interleaved``): ``block`` timed calls a block,
    pairs of rounds until ``budget_s`` seconds once ``min_rounds`` are done, at most ``max_rounds``.

    >>> Plan(block=3, min_rounds=3, max_rounds=8, budget_s=1.0)
    Traceback (most recent call last):
    ...
    ValueError: rounds come in pairs (an order, then its reverse); got 3
    """

    block: int
    min_rounds: int
    max_rounds: int
    budget_s: float

    def __post_init__(self):
        for count in (self.max_rounds, self.min_rounds):
            if count < 2 or count % 2:
                raise ValueError(f"rounds come in pairs (an order, then its reverse); got {count}")
        if self.block < 1 or self.min_rounds > self.max_rounds or not self.budget_s > 0:
            raise ValueError(f"a plan needs block >= 1, min_rounds <= max_rounds and a budget > 0; got {self}")


def time_plan(variants: dict, plan: Plan, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median milliseconds of each variant (``name -> zero-argument callable``), timed interleaved by ``plan``.

    >>> sorted(time_plan({"a": lambda: None, "b": lambda: None}, Plan(1, 2, 2, 0.001)))
    ['a', 'b']
    """
    return medians(
        interleaved(
            variants, plan.max_rounds, plan.block, clock=clock, min_rounds=plan.min_rounds, budget_s=plan.budget_s
        )
    )


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


# -- the machine's load --------------------------------------------------------------------------

# Other processes' CPU use, in cores, above which the machine counts as busy while timing. Half a core
# taken from the cores being timed on moves a multi-threaded runtime's timings (ONNX Runtime with its
# threads spinning ran 1.8x slower beside other work: benchmarks/README.md), while an idle machine's
# daemons use a few hundredths of a core.
BUSY_CORES = 0.5
# The shortest window the load is read over: /proc/stat counts in ticks of 10 ms, so 0.25 s holds 25 a
# core and half a core shows as about 12 of them, well clear of a tick's rounding. A timing that lasts
# longer is its own window and costs nothing more.
LOAD_WINDOW_S = 0.25


class CpuSample(NamedTuple):
    busy_s: float  # CPU seconds anyone spent busy on the cores this process may run on
    own_s: float  # CPU seconds of this process (all its threads) and of its children waited for
    wall_s: float  # time.monotonic()


def busy_seconds(stat_text: str, cpus: set[int] | None = None) -> float:
    """Busy CPU seconds in the text of /proc/stat, summed over ``cpus`` (None: all): user, nice,
    system, irq, softirq and steal (time the hypervisor gave another machine is taken from us too)."""
    total = 0
    for line in stat_text.splitlines():
        name, _, values = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
            continue
        ticks = [int(value) for value in values.split()] + [0] * 8
        user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
        total += user + nice + system + irq + softirq + steal
    return total / os.sysconf("SC_CLK_TCK")


def cpu_sample() -> CpuSample | None:
    """The CPU counters now; None where /proc/stat can't be read (not Linux): the load is then unknown."""
    try:
        with open("/proc/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    own = os.times()
    own_s = own.user + own.system + own.children_user + own.children_system
    return CpuSample(busy_seconds(text, cpus), own_s, time.monotonic())


def other_cores(first: CpuSample | None, last: CpuSample | None) -> float | None:
    """Cores' worth of CPU that other processes used between two samples, on the cores this process
    may run on (a container's neighbours included where they share those cores)."""
    if first is None or last is None or last.wall_s <= first.wall_s:
        return None
    others = (last.busy_s - first.busy_s) - (last.own_s - first.own_s)
    return max(0.0, others / (last.wall_s - first.wall_s))


def machine_load(window_s: float = LOAD_WINDOW_S) -> float | None:
    """Other processes' CPU use, in cores, over the next ``window_s`` seconds (this one sleeping)."""
    first = cpu_sample()
    time.sleep(window_s)
    return other_cores(first, cpu_sample())


@contextlib.contextmanager
def watch_load(min_seconds: float = LOAD_WINDOW_S) -> Iterator[dict]:
    """Read the CPU counters before and after the block: the dict it yields then holds
    ``other_cpu_cores``, other processes' CPU use on the cores timed on over the block (stretched by
    waiting to ``min_seconds``, too short a window says nothing), and ``busy``, whether that is over
    BUSY_CORES; both None where the load can't be read. A block that raises is not measured.

    >>> with watch_load(0.01) as load:
    ...     pass
    >>> sorted(load)
    ['busy', 'other_cpu_cores']
    """
    load: dict = {"other_cpu_cores": None, "busy": None}
    first = cpu_sample()
    yield load
    if first is not None:
        time.sleep(max(0.0, min_seconds - (time.monotonic() - first.wall_s)))
        cores = other_cores(first, cpu_sample())
        if cores is not None:
            load.update(other_cpu_cores=round(cores, 2), busy=cores > BUSY_CORES)


# How every row is timed, so that rows compare like with like on a GPU: from pixels in host memory to
# outputs in host memory, the copies to and from the device inside each timing (what serving one
# request costs). Rows on a GPU say so in their detail; on the CPU there is nothing to copy.
HOST_TO_HOST = "host to host (input copy to the GPU and output copy back timed)"


def timed_on(device: str, detail: str) -> str:
    """``detail`` with the timing policy named where the row runs on a GPU."""
    return f"{detail}; {HOST_TO_HOST}" if device.startswith("gpu") else detail
