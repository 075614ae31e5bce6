"""What the machine is: /proc/cpuinfo parsed from sample text, nvidia-smi asked once a process (a
fake one), library versions and the facts block. No test here depends on the host's hardware."""

import os
import sys

import pytest

from kbench.core import backend, machine

# Two sockets' worth of one processor entry each, trimmed: a Sapphire Rapids Xeon (AMX, AVX512-BF16)
# with two hyper-threads on one core, and an AMD EPYC without bf16 instructions.
XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 2
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 1
core id\t\t: 0
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
EPYC = """processor\t: 0
model name\t: AMD EPYC 7B13
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx2 fma
processor\t: 1
model name\t: AMD EPYC 7B13
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse2 avx2 fma
"""
QUERY = "NVIDIA H200, 143771, 570.124.06\nNVIDIA H200, 143771, 570.124.06\n"


def test_cpuinfo_gives_the_model_features_and_physical_cores():
    xeon = machine.parse_cpuinfo(XEON)
    assert xeon.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert xeon.features == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    assert xeon.native_bf16 and xeon.native_int8
    assert xeon.physical_cores == 2  # two sockets, one core each; the hyper-thread counted once
    epyc = machine.parse_cpuinfo(EPYC)
    assert epyc.model == "AMD EPYC 7B13" and epyc.features == ["avx2"] and epyc.physical_cores == 2
    assert not epyc.native_bf16 and not epyc.native_int8
    avx512_only = machine.parse_cpuinfo("flags : avx512f avx512_vnni\n")  # Cascade Lake: int8, no bf16
    assert not avx512_only.native_bf16 and avx512_only.native_int8
    arm = machine.parse_cpuinfo("processor : 0\nFeatures : fp asimd bf16\n")  # no core ids: the OS's count
    assert arm.flags == {"fp", "asimd", "bf16"} and not arm.native_bf16 and arm.physical_cores == (os.cpu_count() or 1)


def test_this_machines_cpu_is_read_once():
    assert machine.cpu() is machine.cpu()
    assert 1 <= machine.physical_cores() <= (os.cpu_count() or 1)
    assert machine.has_native_bf16() == bool(machine.BF16_FLAGS & machine.cpu().flags)
    assert machine.cpu().model


@pytest.fixture
def nvidia_smi(monkeypatch):
    """Answer nvidia-smi's query with ``answer[0]`` (None: missing or failing), counting the calls;
    the once-a-process cache is emptied before and after, so no fake GPU leaks into other tests."""
    calls, answer = [], [None]

    def run(command, timeout=10):
        calls.append(command)
        return answer[0]

    monkeypatch.setattr(machine, "_run", run)
    machine._nvidia_smi.cache_clear()
    yield answer, calls
    machine._nvidia_smi.cache_clear()


def test_nvidia_smi_is_asked_once_a_process(nvidia_smi):
    answer, calls = nvidia_smi
    answer[0] = QUERY
    assert machine.gpu_details() == [{"name": "NVIDIA H200", "memory_mib": 143771, "driver": "570.124.06"}] * 2
    assert machine.list_gpus() == ["NVIDIA H200", "NVIDIA H200"] and machine.gpu_found()
    assert backend.default_backend()[0] == "jax"
    assert machine.facts()["gpu"] == "NVIDIA H200"
    assert calls == [machine.GPU_QUERY]  # four askers, one call


def test_no_nvidia_smi_means_no_gpus(nvidia_smi):
    answer, calls = nvidia_smi
    assert machine.gpu_details() == [] and machine.list_gpus() == [] and not machine.gpu_found()
    assert machine.facts()["gpu"] == "none" and backend.default_backend()[0] == "tensorflow"
    assert len(calls) == 1


def test_odd_nvidia_smi_lines_are_kept_or_skipped_whole(nvidia_smi):
    answer, _ = nvidia_smi
    answer[0] = "NVIDIA A100-SXM4-80GB, Rev 2, 81920, 550.54.15\nNo devices were found\nGRID T4, [N/A], 535.1\n"
    assert machine.gpu_details() == [
        {"name": "NVIDIA A100-SXM4-80GB, Rev 2", "memory_mib": 81920, "driver": "550.54.15"},
        {"name": "GRID T4", "memory_mib": "[N/A]", "driver": "535.1"},
    ]


def test_a_real_command_that_fails_or_is_missing_gives_none(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert machine._run(machine.GPU_QUERY) is None
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559, 570.124.06'\n")
    assert machine._run(machine.GPU_QUERY) == "NVIDIA H100 80GB HBM3, 81559, 570.124.06\n"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert machine._run(machine.GPU_QUERY) is None
    assert machine._run([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.5) is None  # hangs


def test_versions_and_facts():
    found = machine.versions()
    assert found["python"] and found["keras"] and found["numpy"] and "kbench" in found
    assert machine.versions(("no-such-package-here",)) == {}
    facts = machine.facts(4)
    assert set(facts) == {"cpu", "cores", "gpu", "versions", "threads", "omp_num_threads"}
    assert facts["cores"] == os.cpu_count() and facts["threads"] == 4 and "python" not in facts["versions"]
    assert set(facts["versions"]) <= set(machine.FACT_PACKAGES) and "keras" in facts["versions"]
