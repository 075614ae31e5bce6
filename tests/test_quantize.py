import os
import re

import onnx
import pytest
from onnx import TensorProto, helper

from kbench.serving import quantize

from conftest import BACKEND, run_cli

pytestmark = pytest.mark.once  # ONNX Runtime's side: `make test` runs it under TensorFlow only

# Two configurations are enough to show the choice (the timings are faked); fewer calibrations.
TWO = {label: quantize.CANDIDATES[label] for label in ("QDQ S8S8 per-channel", "QOperator U8S8 per-channel")}


@pytest.fixture(scope="module")
def exported(small_cnn_run, tmp_path_factory):
    """A small_cnn run with a validation split and its float ONNX file."""
    folder = tmp_path_factory.mktemp("quantize")
    run_dir = small_cnn_run()
    done = run_cli("export", "onnx", run_dir, "-o", str(folder / "m.onnx"), "--backend", BACKEND)
    assert done.returncode == 0, done.stderr
    return run_dir, str(folder / "m.onnx")


def fake_timings(float_ms: float, int8_ms: float):
    def time_against_float(paths, image_size):
        assert list(paths)[0] == "float" and all(os.path.isfile(path) for path in paths.values())
        return {label: float_ms if label == "float" else int8_ms + index for index, label in enumerate(paths)}

    return time_against_float


def export_int8(run_dir, float_path):
    return run_cli("export", "onnx", run_dir, "-o", float_path, "--quantize", "int8", "--backend", BACKEND)


def test_the_fastest_configuration_within_the_log_loss_bound_is_kept(exported, monkeypatch):
    run_dir, float_path = exported
    monkeypatch.setattr(quantize, "CANDIDATES", TWO)
    monkeypatch.setattr(quantize, "time_against_float", fake_timings(10.0, 4.0))
    done = export_int8(run_dir, float_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()[-2:]
    assert lines[0].startswith(f"wrote {quantize.int8_path(float_path)} (QDQ S8S8 per-channel, calibrated on ")
    assert lines[0].endswith("batch-1 latency 10.00 ms -> 5.00 ms (2.00x)")  # QDQ first: 4 + 1
    scores = re.match(r"validation log loss ([0-9.]+) -> ([0-9.]+) \(bound ([0-9.]+)\), accuracy ", lines[1])
    before, after, bound = map(float, scores.groups())
    assert after <= bound == pytest.approx(quantize.log_loss_bound(before), abs=1e-4)
    int8 = onnx.load(quantize.int8_path(float_path))
    assert any(node.op_type == "QuantizeLinear" for node in int8.graph.node)


def test_no_faster_configuration_writes_no_file_in_one_line(exported, monkeypatch):
    run_dir, float_path = exported
    with open(quantize.int8_path(float_path), "wb") as handle:  # an earlier run's file
        handle.write(b"old")
    monkeypatch.setattr(quantize, "CANDIDATES", TWO)
    monkeypatch.setattr(quantize, "time_against_float", fake_timings(1.0, 1.0))  # within the margin: a tie
    done = export_int8(run_dir, float_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == (
        "no int8 file written: no int8 configuration was faster than the float file at batch 1 (float 1.00 ms; "
        f"fastest int8, QDQ S8S8 per-channel, 2.00 ms) (removed the earlier {quantize.int8_path(float_path)})"
    )
    assert not os.path.exists(quantize.int8_path(float_path)) and os.path.exists(float_path)


def test_a_faster_configuration_that_loses_log_loss_is_not_kept(exported, monkeypatch):
    run_dir, float_path = exported
    monkeypatch.setattr(quantize, "CANDIDATES", TWO)
    monkeypatch.setattr(quantize, "time_against_float", fake_timings(10.0, 4.0))
    monkeypatch.setattr(quantize, "LOG_LOSS_BOUND", {"absolute": -1.0, "relative": -1.0})  # nothing fits
    done = export_int8(run_dir, float_path)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("no int8 file written: the int8 configurations faster than the float file lose too much")
    assert not os.path.exists(quantize.int8_path(float_path))


def test_float_parts_are_depthwise_and_squeeze_excite_convolutions():
    def conv(name, source, groups=1):
        return helper.make_node("Conv", [source, f"{name}_w"], [name], name=name, group=groups)

    nodes = [
        conv("stem", "pixels"),
        conv("depthwise", "stem", groups=8),
        helper.make_node("GlobalAveragePool", ["depthwise"], ["pooled"], name="pool"),
        conv("se_reduce", "pooled"),
        helper.make_node("Relu", ["se_reduce"], ["relu"], name="relu"),
        conv("se_expand", "relu"),
        helper.make_node("Sigmoid", ["se_expand"], ["gate"], name="sigmoid"),
        helper.make_node("Mul", ["depthwise", "gate"], ["excited"], name="mul"),
        conv("project", "excited"),
    ]
    pixels = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 8, 4, 4])
    out = helper.make_tensor_value_info("project", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "se", [pixels], [out]))
    assert quantize.float_nodes(model) == ["depthwise", "se_reduce", "se_expand"]


def test_an_ensemble_of_members_of_other_sizes_quantizes_and_openvino_says_why_it_cant_run_qoperator(
    class_folders, tmp_path, monkeypatch
):
    """Members at 32 and 24 px behind one 32 px input: ONNX Runtime's symbolic shape inference gives up
    on the resizes (it was "unexpected Exception"); the int8 file is still made. Its QOperator form uses
    ONNX Runtime's own operators: OpenVINO's rows are unavailable with that reason, not a crash."""
    import keras

    from kbench.export.onnx import export_onnx
    from kbench.models.backbones import build_classifier, get_backbone
    from kbench.models.settle import settle_random_weights
    from kbench.serving.latency import LatencyConfig, iter_latency

    image = keras.Input(
        (32, 32, 3), name="image"
    )  # kbench.training.ensemble's "mean": the larger member reads it as is
    members = [build_classifier(get_backbone("small_cnn"), 2, size) for size in (32, 24)]
    for member, size in zip(members, (32, 24)):
        member.name = f"member_{size}"
        settle_random_weights(member)
    resized = keras.layers.Resizing(24, 24, name="resize_member_24")(image)
    pair = keras.Model(image, keras.layers.Average(name="probability")([members[0](image), members[1](resized)]))
    float_path, int8 = str(tmp_path / "pair.onnx"), str(tmp_path / "pair.int8.onnx")
    export_onnx(pair, float_path)
    monkeypatch.setattr(quantize, "time_against_float", lambda paths, size: {**dict.fromkeys(paths, 1.0), "float": 2.0})
    qoperator = {"QOperator U8S8 per-channel": quantize.CANDIDATES["QOperator U8S8 per-channel"]}
    assert quantize.quantize_int8(float_path, int8, class_folders, candidates=qoperator)["int8_path"] == int8
    config = LatencyConfig([int8], ["onnxruntime-cpu", "openvino-cpu", "openvino-cpu-bf16"], [1], runs=2, warmup=1)
    rows = list(iter_latency(config))
    assert rows[0]["status"] == "ok"
    for row in rows[1:]:
        assert row["status"].startswith("unavailable: ") and "OpenVINO" in row["status"], row
    assert "ONNX Runtime's own operators (" in rows[1]["status"]


def test_nothing_to_calibrate_on_is_refused_before_the_float_file_is_written(exported, tmp_path):
    import kbench
    from kbench.core.errors import KbenchError

    run_dir, _ = exported
    model_file = os.path.join(run_dir, "model.keras")  # a file, not a run folder: no training split
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("no images")
    import cv2
    import numpy as np

    (tmp_path / "stray").mkdir()
    cv2.imwrite(str(tmp_path / "stray" / "a.png"), np.zeros((8, 8, 3), np.uint8))  # one stray picture
    cases = [
        ([], "--quantize int8 needs --calibration-data PATH"),
        (["--calibration-data", str(tmp_path / "empty")], "no images (.jpg"),
        (["--calibration-data", str(tmp_path / "missing")], "data not found"),
        (["--calibration-data", str(tmp_path / "notes.txt")], "is neither a folder nor a zip file"),
        (["--calibration-data", str(tmp_path / "stray")], "stray holds 1 image; int8 calibration needs at least 16"),
    ]
    output = tmp_path / "out" / "m.onnx"
    for extra, message in cases:
        done = run_cli("export", "onnx", model_file, "-o", str(output), "--quantize", "int8", *extra)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
        assert not (tmp_path / "out").exists()
    model = kbench.Run(run_dir).load_model()
    with pytest.raises(KbenchError, match="in-memory model needs calibration_data"):
        kbench.export_onnx(model, str(output), quantize="int8")
    assert not (tmp_path / "out").exists()
