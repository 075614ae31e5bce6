import dataclasses
import os
import re
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kbench.core import machine, timing
from kbench.core.errors import KbenchError, Unavailable
from kbench.serving import onnx_runtime
from kbench.serving import openvino as ovruntime
from kbench.serving.onnx_runtime import (
    FIXED_CPU_SETTINGS,
    MEASURED_CPU_SETTINGS,
    CpuSettings,
    OnnxRuntimeCPU,
    OnnxRuntimeCUDA,
)
from kbench.serving.runtimes import make_runtime


def tiny_onnx(path, batch="batch", size=("h", "w")) -> str:
    """A pooling-only ONNX model over NHWC pixels: (batch, h, w, 3) -> (batch, 1, 1, 3); no Keras."""
    pixels = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, *size, 3])
    pooled = helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [batch, 1, 1, 3])
    node = helper.make_node("ReduceMean", ["pixels"], ["pooled"], axes=[1, 2], keepdims=1)
    graph = helper.make_graph([node], "tiny", [pixels], [pooled])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return str(path)


def spin_entry(runtime) -> str:
    """The session's spinning entry; "" where none was set (ONNX Runtime's default: on)."""
    try:
        return runtime.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:
        return ""


def fake_interleaved(values: dict):
    """A stand-in for kbench.core.timing.interleaved that calls each variant once and returns ``values`` (ms)."""

    def interleaved(calls, *_, **__):
        for call in calls.values():
            call()
        return {name: [value] for name, value in values.items()}

    return interleaved


class FakeInput:
    def __init__(self, shape):
        self.name, self.shape = "pixels", shape


class FakeSession:
    def __init__(self, shape):
        self.shape = shape

    def get_inputs(self):
        return [FakeInput(self.shape)]


@pytest.mark.parametrize(
    "dims, expected",
    [
        (["N", None, 0, 3], (1, 9, 7, 3)),
        (["N", 5, 6, "C"], (1, 5, 6, 3)),
        ([4, 8, 8, 3], (4, 8, 8, 3)),
        (["N", 5], (1, 5)),
        ([], ()),
    ],
)
def test_probe_feed_keeps_fixed_dimensions_and_fills_the_rest(dims, expected):
    (pixels,) = onnx_runtime.probe_feed(FakeSession(dims), (9, 7)).values()
    assert pixels.shape == expected and pixels.dtype == np.float32


def test_the_faster_spinning_setting_is_kept_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_runtime.timing, "interleaved", fake_interleaved({"spinning on": 5.0, "spinning off": 9.0}))
    runtime = OnnxRuntimeCPU(settings=MEASURED_CPU_SETTINGS)
    runtime.prepare(tiny_onnx(tmp_path / "tiny.onnx"), (8, 8))
    assert spin_entry(runtime) == "1" and runtime.session.get_session_options().intra_op_num_threads == 0
    assert runtime.detail.startswith("intra-op threads ONNX Runtime's default, spinning on, ")
    assert runtime.detail.endswith("(chosen by measuring at batch 1: spinning on 5.00 ms, spinning off 9.00 ms)")
    pooled = runtime.run(np.full((2, 8, 8, 3), 7.0, np.float32))[0]
    assert pooled.shape == (2, 1, 1, 3) and np.allclose(pooled, 7.0)


def test_a_tie_keeps_spinning_off_and_the_thread_count(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_runtime.timing, "interleaved", fake_interleaved({"spinning on": 5.0, "spinning off": 5.1}))
    runtime = OnnxRuntimeCPU(settings=MEASURED_CPU_SETTINGS)
    runtime.prepare(tiny_onnx(tmp_path / "tiny.onnx"), (8, 8))
    assert spin_entry(runtime) == "0"
    assert runtime.session.get_session_options().intra_op_num_threads == machine.physical_cores()
    assert runtime.detail.startswith(f"intra-op threads {machine.physical_cores()} (physical cores), spinning off")


def test_given_threads_are_used_by_both_candidates(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_runtime.timing, "interleaved", fake_interleaved({"spinning on": 1.0, "spinning off": 9.0}))
    runtime = make_runtime("onnxruntime-cpu", threads=1, tune=True)
    runtime.prepare(tiny_onnx(tmp_path / "tiny.onnx"), (8, 8))
    assert spin_entry(runtime) == "1" and runtime.session.get_session_options().intra_op_num_threads == 1
    assert runtime.detail.startswith("intra-op threads 1, spinning on")


def test_a_fixed_batch_above_one_is_not_probed(tmp_path, monkeypatch):
    """Two sessions of a big model at a big batch may not fit in memory: spinning off, said so."""

    def refuse(*_, **__):
        raise AssertionError("probed")

    monkeypatch.setattr(onnx_runtime.timing, "interleaved", refuse)
    runtime = OnnxRuntimeCPU(settings=MEASURED_CPU_SETTINGS)
    runtime.prepare(tiny_onnx(tmp_path / "fixed.onnx", batch=4, size=(6, 5)), (99, 99))
    assert spin_entry(runtime) == "0"
    assert runtime.detail.endswith("(spinning not measured: the file takes batches of 4 only)")


def test_the_probe_keeps_one_session_alive(tmp_path, monkeypatch):
    import gc
    import weakref

    alive = [0]
    real = onnx_runtime.onnx_session

    def counted(*args, **kwargs):
        made = real(*args, **kwargs)
        alive[0] += 1
        weakref.finalize(made, lambda: alive.__setitem__(0, alive[0] - 1))
        return made

    monkeypatch.setattr(onnx_runtime, "onnx_session", counted)
    monkeypatch.setattr(onnx_runtime.timing, "interleaved", fake_interleaved({"spinning on": 2.0, "spinning off": 1.0}))
    runtime = OnnxRuntimeCPU(settings=MEASURED_CPU_SETTINGS)
    runtime.prepare(tiny_onnx(tmp_path / "tiny.onnx"), (8, 8))
    gc.collect()
    assert alive[0] == 1 and spin_entry(runtime) == "0"


def test_the_fixed_settings_by_default_named_in_the_detail(tmp_path, monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("probed")

    monkeypatch.setattr(onnx_runtime.timing, "interleaved", refuse)
    runtime = make_runtime("onnxruntime-cpu")
    runtime.prepare(tiny_onnx(tmp_path / "tiny.onnx"), (8, 8))
    assert spin_entry(runtime) == "1" and runtime.session.get_session_options().intra_op_num_threads == 0
    assert runtime.detail == (
        "intra-op threads ONNX Runtime's default, spinning on, denormals as zero off, NHWC transformer on "
        "(fixed; --tune measures spinning per model)"
    )
    given = make_runtime("onnxruntime-cpu", threads=1)
    given.prepare(tiny_onnx(tmp_path / "tiny.onnx"), (8, 8))
    assert given.session.get_session_options().intra_op_num_threads == 1 and spin_entry(given) == "1"


@pytest.mark.parametrize(
    "settings",
    [
        replace(FIXED_CPU_SETTINGS, spinning=False),
        FIXED_CPU_SETTINGS,
        CpuSettings(),
        replace(MEASURED_CPU_SETTINGS, measure_spinning=False, spinning=False),
    ],
)
def test_no_probe_where_spinning_is_given_or_untuned(tmp_path, monkeypatch, settings):
    def refuse(*_, **__):
        raise AssertionError("probed")

    monkeypatch.setattr(onnx_runtime.timing, "interleaved", refuse)
    runtime = OnnxRuntimeCPU(settings=settings)
    runtime.prepare(tiny_onnx(tmp_path / "tiny.onnx"), (8, 8))
    assert "chosen by measuring" not in runtime.detail
    expected = {True: "1", False: "0"}.get(settings.spinning, "")
    assert spin_entry(runtime) == expected


def test_a_model_the_probe_cannot_run_keeps_spinning_off_and_fails_in_its_row(tmp_path):
    """An input the file can't take (here: integer pixels) is not the probe's error to raise: the
    session with spinning off is kept and the timed runs report the failure."""
    pixels = helper.make_tensor_value_info("pixels", TensorProto.INT64, ["batch", 4])
    doubled = helper.make_tensor_value_info("doubled", TensorProto.INT64, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Add", ["pixels", "pixels"], ["doubled"])], "ints", [pixels], [doubled])
    path = tmp_path / "ints.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    runtime = OnnxRuntimeCPU(settings=MEASURED_CPU_SETTINGS)
    runtime.prepare(str(path), (8, 8))
    assert spin_entry(runtime) == "0" and runtime.detail.endswith("(spinning not measured: InvalidArgument)")
    with pytest.raises(Exception, match="INVALID_ARGUMENT"):
        runtime.run(np.zeros((1, 4), np.float32))


def test_the_probe_really_measures(tmp_path):
    import re

    runtime = OnnxRuntimeCPU(settings=MEASURED_CPU_SETTINGS)
    runtime.prepare(tiny_onnx(tmp_path / "tiny.onnx"), (16, 16))
    found = re.search(
        r"\(chosen by measuring at batch 1: spinning on ([\d.]+) ms, spinning off ([\d.]+) ms\)$", runtime.detail
    )
    # the choice is checked against the unrounded medians: a tiny model runs in ~0.01 ms, where the
    # detail's rounding (2 decimals, or 3 significant figures under 1 ms) can't decide a 3 % tie (CI failed once)
    on, off = runtime.probe_medians["spinning on"], runtime.probe_medians["spinning off"]
    assert float(found[1]) == pytest.approx(on, rel=0.01) and float(found[2]) == pytest.approx(off, rel=0.01)
    spinning = off > onnx_runtime.SPINNING_TIE * on
    assert spin_entry(runtime) == ("1" if spinning else "0") and runtime.settings.spinning is spinning
    assert not runtime.settings.measure_spinning  # measured once, then fixed
    assert runtime.session.get_session_options().intra_op_num_threads == (0 if spinning else machine.physical_cores())


def test_an_input_the_probe_cannot_shape_is_not_probed(tmp_path):
    scalar = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [])
    same = helper.make_tensor_value_info("same", TensorProto.FLOAT, [])
    graph = helper.make_graph([helper.make_node("Identity", ["pixels"], ["same"])], "scalar", [scalar], [same])
    path = tmp_path / "scalar.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    runtime = OnnxRuntimeCPU(settings=MEASURED_CPU_SETTINGS)
    runtime.prepare(str(path), (8, 8))
    assert spin_entry(runtime) == "0" and runtime.detail.endswith("(spinning not measured: IndexError)")


def test_cuda_keeps_spinning_off_unmeasured():
    assert OnnxRuntimeCUDA().options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_cpu_settings_are_typed_and_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FIXED_CPU_SETTINGS.spinning = False
    with pytest.raises(ValueError, match="either given or measured"):
        CpuSettings(spinning=False, measure_spinning=True)
    assert make_runtime("onnxruntime-cpu", tune=True).settings == MEASURED_CPU_SETTINGS
    assert make_runtime("onnxruntime-cpu").settings == FIXED_CPU_SETTINGS


def test_the_settings_record_keys_saved_study_timings_as_before():
    """The study keys a model's saved timings by this record: it has the form the settings' dicts had,
    so timings saved before the settings were typed are reused, not measured again."""
    assert onnx_runtime.cpu_settings_record() == {
        "denormal_as_zero": False,
        "nhwc": True,
        "spinning": True,
        "spinning_candidates": {"spinning on": {"spinning": True, "threads": 0}, "spinning off": {"spinning": False}},
        "spinning_probe": {"block": 3, "min_rounds": 4, "max_rounds": 8, "budget_s": 2.0, "tie": 1.03},
    }


def test_node_placement_is_read_from_the_first_runs_profile(tmp_path):
    """onnxruntime-cuda's detail names the nodes ONNX Runtime placed on the CPU, from a profile of its
    first run; here a CPU session's profile, read as a CUDA session's would be (the profile is removed)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(tmp_path / "profile")
    session = onnxruntime.InferenceSession(
        tiny_onnx(tmp_path / "tiny.onnx"), options, providers=["CPUExecutionProvider"]
    )
    session.run(None, {"pixels": np.zeros((1, 8, 8, 3), np.float32)})
    placement = onnx_runtime.node_providers(session.end_profiling())
    assert placement == {"CPUExecutionProvider": ["ReduceMean"]} and not list(tmp_path.glob("profile*"))
    detail = onnx_runtime.cuda_detail({"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"}, placement)
    assert detail == (
        f"IO binding, {timing.HOST_TO_HOST}; CUDA provider device_id 0, cudnn_conv_algo_search EXHAUSTIVE; "
        "1 of 1 nodes on the CPU: ReduceMean"
    )
    on_gpu = onnx_runtime.cuda_detail({}, {"CUDAExecutionProvider": ["Conv", "Conv"]})
    assert on_gpu.endswith("; 0 of 2 nodes on the CPU")


def test_every_library_names_a_card_alike():
    names = ["cuda:0", "gpu:0", "/job:localhost/replica:0/task:0/device:GPU:0", "/device:GPU:0"]
    assert {machine.device_name(name) for name in names} == {"gpu:0"}
    assert {machine.device_name(name) for name in ("cpu:0", "CPU", "/device:CPU:0")} == {"cpu"}


def test_openvino_f32_runs_the_onnx_file_in_float32_with_its_settings_named(tmp_path):
    runtime = make_runtime("openvino-cpu")
    runtime.prepare(tiny_onnx(tmp_path / "tiny.onnx"), (8, 8))
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    pooled = runtime.run(pixels)[0]
    assert pooled.shape == (2, 1, 1, 3) and np.allclose(pooled, pixels.mean(axis=(1, 2), keepdims=True), rtol=1e-5)
    assert runtime.run(pixels[:1])[0].shape == (1, 1, 1, 3)  # another batch size: compiled for its shape
    compiled = runtime.request((2, 8, 8, 3)).get_compiled_model()
    # explicit: OpenVINO's CPU plugin would infer in bf16 on a CPU with AMX
    assert compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    assert compiled.get_property("INFERENCE_NUM_THREADS") == machine.physical_cores()
    threads = f"inference threads {machine.physical_cores()} (physical cores)"
    assert (
        runtime.detail
        == f"f32 inference precision, performance hint LATENCY, {threads}, not pinned, compiled per batch size"
    )
    assert compiled.get_property("ENABLE_CPU_PINNING") is False
    assert runtime.tolerance == 1e-4 and runtime.needs == "onnx" and runtime.library == "openvino"


def test_openvino_bf16_runs_only_where_the_cpu_has_bf16(tmp_path, monkeypatch):
    path = tiny_onnx(tmp_path / "tiny.onnx")
    if machine.has_native_bf16():  # only there: a bf16 compile
        runtime = make_runtime("openvino-cpu-bf16", threads=1)
        runtime.prepare(path, (8, 8))
        runtime.run(np.ones((1, 8, 8, 3), np.float32))
        compiled = runtime.request((1, 8, 8, 3)).get_compiled_model()
        assert compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"
        assert runtime.detail.startswith("bf16 inference precision") and "inference threads 1," in runtime.detail
    monkeypatch.setattr(ovruntime, "has_native_bf16", lambda: False)
    with pytest.raises(Unavailable, match="has no native bf16 .* would be emulated"):
        make_runtime("openvino-cpu-bf16").prepare(path, (8, 8))


def test_openvino_refuses_a_file_it_cannot_read_in_one_line(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(KbenchError, match="bad.onnx is not a model OpenVINO can read: ") as error:
        make_runtime("openvino-cpu").prepare(str(tmp_path / "bad.onnx"), (8, 8))
    assert "\n" not in str(error.value)


def test_openvino_is_imported_without_its_telemetry(tmp_path):
    """``import openvino`` imports its converter, whose import sends a usage event unless a consent file
    in the home folder says no; kbench's import must neither load the telemetry nor write that folder."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from kbench.serving.runtimes import make_runtime\n"
        f"make_runtime('openvino-cpu').prepare({tiny_onnx(tmp_path / 'tiny.onnx')!r}, (8, 8))\n"
        "print('openvino_telemetry' in sys.modules, 'openvino' in sys.modules)\n"
        "print(sys.modules.get('openvino.tools.ovc', 'importable'))\n"  # the refusal isn't left behind
    )
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "CI": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "importable"] and not (home / "intel").exists()


@pytest.mark.parametrize(
    "installed, message",
    [
        (["onnxruntime", "onnxruntime-gpu"], "both onnxruntime and onnxruntime-gpu are installed in one module folder"),
        ([], "ONNX Runtime is not installed: pip install 'kbench[cpu]'"),
        (["onnxruntime-gpu"], "ONNX Runtime can't be imported (import of onnxruntime halted"),
    ],
)
def test_two_onnxruntimes_or_none_are_refused_in_one_line_with_the_fix(monkeypatch, installed, message):
    """onnxruntime and onnxruntime-gpu write one module folder: a command that needs ONNX Runtime
    refuses (exit 2) in one line that says how to get back to one, before exporting or timing."""
    import sys

    from kbench.core import machine
    from kbench.export.onnx import export_onnx
    from kbench.serving.latency import LatencyConfig

    from conftest import run_cli

    monkeypatch.setattr(machine, "onnxruntime_packages", lambda: installed)
    if len(installed) < 2:  # the folder gone, or half-removed
        monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(KbenchError, match=re.escape(message)) as error:
        machine.onnxruntime_module()
    assert "\n" not in str(error.value) and "make install" in str(error.value)
    with pytest.raises(KbenchError, match=re.escape(message)):
        LatencyConfig(["small_cnn"], ["keras-predict", "onnxruntime-cpu"]).check()
    LatencyConfig(["small_cnn"], ["keras-predict"]).check()  # Keras alone needs no ONNX Runtime
    with pytest.raises(KbenchError, match=re.escape(message)):  # before any conversion
        export_onnx("model.keras", "model.onnx")
    done = run_cli("latency", "small_cnn", "--runtime", "onnxruntime-cpu")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and message in done.stderr
