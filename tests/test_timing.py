import os
import subprocess
import sys
import time

import numpy as np
import pytest

from kbench.core import timing


class FakeClock:
    """A clock that moves only when told: each fake call advances it by that call's duration (seconds)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float, log: list | None = None, label: str = ""):
        def call():
            self.now += seconds
            if log is not None:
                log.append(label)

        return call


def test_time_calls_times_each_run_and_leaves_the_warmup_out():
    clock, log = FakeClock(), []
    durations = iter([5.0, 5.0, 0.001, 0.002, 0.003])  # two slow warm-up calls, then three timed ones

    def call():
        clock.now += next(durations)
        log.append("call")

    synced = []
    timings = timing.time_calls(call, runs=3, warmup=2, clock=clock, sync=lambda: synced.append(clock.now))
    assert log == ["call"] * 5 and len(synced) == 5  # the warm-up calls are synchronised too
    assert timings == pytest.approx([1.0, 2.0, 3.0])  # milliseconds, the warm-up's 5 s in none of them


def test_the_sync_is_inside_the_timed_region():
    clock = FakeClock()
    timings = timing.time_calls(clock.work(0.001), runs=2, sync=clock.work(0.004), clock=clock)
    assert timings == pytest.approx([5.0, 5.0])  # a dispatch of 1 ms whose work ends 4 ms later: 5 ms


def test_stop_ends_the_loop_early():
    clock = FakeClock()
    timings = timing.time_calls(clock.work(0.5), runs=30, clock=clock, stop=lambda t: sum(t) >= 1500)
    assert len(timings) == 3


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_paired_order_balances_each_pair_and_rotates(count):
    names = [f"v{i}" for i in range(count)]
    orders = timing.paired_order(names, 2 * count)
    for first, second in zip(orders[::2], orders[1::2]):
        assert second == first[::-1]  # an order, then its reverse
        positions = {name: first.index(name) + second.index(name) for name in names}
        assert len(set(positions.values())) == 1  # every variant's mean position the same in each pair
    assert [order[0] for order in orders[::2]] == names  # each variant opens one pair of rounds


def test_interleaved_counts_warmups_and_timed_calls_in_paired_order():
    clock, log = FakeClock(), []
    variants = {name: clock.work(ms / 1000, log, name) for name, ms in (("a", 1.0), ("b", 2.0), ("c", 4.0))}
    timings = timing.interleaved(variants, rounds=4, runs=2, warmup=1, block_warmup=1, clock=clock)
    assert {name: len(values) for name, values in timings.items()} == {"a": 8, "b": 8, "c": 8}
    assert timings["a"] == pytest.approx([1.0] * 8) and timings["c"] == pytest.approx([4.0] * 8)
    assert log[:3] == ["a", "b", "c"]  # the first warm-up of each
    blocks = [log[3 + 3 * i : 3 + 3 * (i + 1)] for i in range(12)]  # then blocks: 1 untimed + 2 timed calls
    assert all(len(set(block)) == 1 for block in blocks)
    assert [block[0] for block in blocks] == list("abc" + "cba" + "bca" + "acb")
    assert len(log) == 3 + 4 * 3 * 3
    assert timing.medians(timings) == pytest.approx({"a": 1.0, "b": 2.0, "c": 4.0})


def test_interleaved_opens_each_block_and_drops_it_after():
    opened, alive, most = [], [0], [0]

    class Session:
        def __init__(self, name):
            opened.append(name)
            alive[0] += 1
            most[0] = max(most[0], alive[0])

        def __del__(self):
            alive[0] -= 1

        def run(self):
            pass

    def open_block(name):
        session = Session(name)
        return lambda: session.run()

    timing.interleaved({"a": "a", "b": "b"}, rounds=2, runs=1, warmup=0, open_block=open_block)
    assert opened == ["a", "b", "b", "a"] and most[0] == 1 and alive[0] == 0


def test_interleaved_stops_after_a_pair_once_the_budget_is_spent():
    clock = FakeClock()
    timings = timing.interleaved(
        {"a": clock.work(0.1), "b": clock.work(0.1)}, rounds=8, runs=1, min_rounds=2, budget_s=1.0, clock=clock
    )
    assert len(timings["a"]) == 4  # 0.4 s a round: the budget was spent in round 3, its pair finishes
    clock = FakeClock()
    few = timing.interleaved({"a": clock.work(0.001)}, rounds=8, runs=1, min_rounds=4, budget_s=60, clock=clock)
    assert len(few["a"]) == 8  # the budget never spent: every round


@pytest.mark.parametrize("rounds, min_rounds", [(3, None), (1, None), (4, 3)])
def test_interleaved_refuses_rounds_that_are_not_pairs(rounds, min_rounds):
    with pytest.raises(ValueError, match="pairs"):
        timing.interleaved({"a": lambda: None}, rounds=rounds, runs=1, min_rounds=min_rounds, budget_s=1)


def test_stats_from_known_timings():
    stats = timing.stats([4.0, 1.0, 3.0, 2.0, 100.0])
    assert stats["min_ms"] == 1.0 and stats["p50_ms"] == 3.0 and stats["mean_ms"] == 22.0
    assert stats["p90_ms"] == pytest.approx(61.6) and stats["p99_ms"] == pytest.approx(96.16)
    assert stats["std_ms"] == pytest.approx(np.std([4, 1, 3, 2, 100]))
    with pytest.raises(ValueError):
        timing.stats([])


STAT = """cpu  500 0 100 900 0 0 0 0 0 0
cpu0 100 10 20 300 5 1 2 3 0 0
cpu1 400 0 80 600 0 0 0 0 0 0
intr 1 2 3
"""


def test_busy_seconds_counts_the_busy_ticks_of_the_cores_asked_for():
    tick = os.sysconf("SC_CLK_TCK")
    assert timing.busy_seconds(STAT, {0}) == pytest.approx((100 + 10 + 20 + 1 + 2 + 3) / tick)  # idle, iowait out
    assert timing.busy_seconds(STAT) == pytest.approx((136 + 480) / tick)  # the "cpu" total line not counted twice


def test_other_cores_subtracts_this_process_and_never_goes_negative():
    first = timing.CpuSample(busy_s=10.0, own_s=2.0, wall_s=100.0)
    assert timing.other_cores(first, timing.CpuSample(11.5, 2.5, 101.0)) == pytest.approx(1.0)  # 1.5 busy, 0.5 ours
    assert timing.other_cores(first, timing.CpuSample(10.5, 3.0, 101.0)) == 0.0  # ticks rounded the other way
    assert timing.other_cores(first, None) is None and timing.other_cores(first, first) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the load is read from /proc/stat")
def test_the_load_check_flags_a_machine_that_other_processes_keep_busy():
    """Busy-looping children, one per core timed on (at most 4), for about a second: the check says
    busy. (Whether an idle machine reads as idle is not asserted: a shared CI machine may never be.)"""
    spin = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end:\n    pass"
    children = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(min(len(cpus()), 4))]
    try:
        time.sleep(0.2)  # started
        with timing.watch_load(0.6) as load:
            pass
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert load["busy"] is True and load["other_cpu_cores"] > timing.BUSY_CORES


def cpus() -> set:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else {0}


def test_a_block_that_raises_is_not_measured():
    with pytest.raises(RuntimeError):
        with timing.watch_load(5.0) as load:  # no 5 s wait either
            raise RuntimeError("failed row")
    assert load == {"other_cpu_cores": None, "busy": None}


def test_one_call_times_a_plan_interleaved_within_its_rounds():
    """quantize's and the spinning probe's timings: one typed plan, one call; a budget never reached
    runs max_rounds, each variant's blocks holding ``block`` timed calls after one untimed one."""
    calls = {"a": 0, "b": 0}

    def count(name):
        calls[name] += 1

    ticks = iter(range(10_000))
    medians = timing.time_plan(
        {name: (lambda n=name: count(n)) for name in calls},
        timing.Plan(block=2, min_rounds=2, max_rounds=4, budget_s=1e9),
        clock=lambda: next(ticks),
    )
    assert calls == {"a": 1 + 4 * (1 + 2), "b": 1 + 4 * (1 + 2)} and medians == {"a": 1000.0, "b": 1000.0}
    with pytest.raises(ValueError, match="rounds come in pairs"):
        timing.Plan(block=1, min_rounds=2, max_rounds=5, budget_s=1.0)
