"""kbench.export.convert: tf2onnx's passes each after a collection and put back after, a killed
conversion child named in one line, the child's environment, and the hold on the private keras and
tf2onnx internals it patches (if one is renamed, this fails loudly instead of an export quietly
losing its memory fix or its convertible ops). The export as a whole is test_export.py's."""

import pytest

from kbench.core.errors import KbenchError
from kbench.export import convert as convert_module

pytestmark = pytest.mark.once  # the conversion's own mechanics, whatever the backend


def test_the_private_internals_the_conversion_patches_are_still_there():
    from keras.src.backend.tensorflow import nn
    from tf2onnx import optimizer

    # kbench.export.convert._collected_between_optimizers wraps each pass of this table
    assert isinstance(getattr(optimizer, "_optimizers", None), dict) and optimizer._optimizers
    assert all(callable(factory) for factory in optimizer._optimizers.values())
    # kbench.export.convert._convertible_ops swaps these two and calls the third
    for name in ("conv", "gelu", "_convert_data_format"):
        assert callable(getattr(nn, name, None)), f"keras.src.backend.tensorflow.nn.{name} is gone"
    assert nn._convert_data_format("channels_last", 4) == "NHWC"


def test_tf2onnx_optimizers_are_restored_after_conversion():
    """The collection hook around tf2onnx's optimiser (its deep copies are freed between passes) is
    put back afterwards, also when the conversion fails."""
    pytest.importorskip("tf2onnx")
    import gc

    from tf2onnx import optimizer

    before = dict(optimizer._optimizers)
    with convert_module._collected_between_optimizers():
        assert all(optimizer._optimizers[name] is not before[name] for name in before)
        optimizer._optimizers[next(iter(before))]()  # a wrapped factory still makes its optimiser
        assert gc.get_freeze_count() > 0  # the collections scan only what the conversion made
    assert optimizer._optimizers == before and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), convert_module._collected_between_optimizers():
        raise RuntimeError("conversion failed")
    assert optimizer._optimizers == before and gc.get_freeze_count() == 0


def test_each_tf2onnx_pass_is_made_after_a_collection_and_a_tf2onnx_without_the_table_is_left_as_it_is(monkeypatch):
    """The memory fix itself: a wrapped factory collects, then makes tf2onnx's own pass. A tf2onnx
    without the table (another version) converts as it is: nothing added to it."""
    pytest.importorskip("tf2onnx")
    from tf2onnx import optimizer

    own = dict(optimizer._optimizers)
    name = next(iter(own))
    collections = []
    monkeypatch.setattr(convert_module.gc, "collect", lambda *_: collections.append(1))
    with convert_module._collected_between_optimizers():
        assert type(optimizer._optimizers[name]()) is own[name] and collections == [1]
    monkeypatch.delattr(optimizer, "_optimizers")
    entered = []
    with convert_module._collected_between_optimizers():
        entered.append(True)
    assert entered == [True] and not hasattr(optimizer, "_optimizers")


def test_a_killed_conversion_process_is_named_not_its_last_warning(tmp_path, monkeypatch):
    """Under JAX the conversion runs in a TensorFlow child. When the kernel kills it (the OOM killer's
    SIGKILL), the error names the signal, not the last line the child printed before, which is often an
    unrelated TensorFlow warning."""
    import subprocess

    def ended(returncode, stderr):
        return lambda command, **_: subprocess.CompletedProcess(command, returncode, "", stderr)

    convert = lambda: convert_module.convert_in_tensorflow_process("m.keras", str(tmp_path / "m.onnx"), 17, None)
    monkeypatch.setattr(convert_module.subprocess, "run", ended(-9, "W0000 some unrelated TensorFlow warning\n"))
    with pytest.raises(KbenchError) as caught:
        convert()
    assert str(caught.value) == "ONNX conversion failed: its process was killed by SIGKILL (signal 9) (out of memory?)"
    monkeypatch.setattr(convert_module.subprocess, "run", ended(-15, "W0000 a warning\n"))
    with pytest.raises(KbenchError, match=r"killed by SIGTERM \(signal 15\)$"):
        convert()
    monkeypatch.setattr(convert_module.subprocess, "run", ended(1, "W0000 a warning\nValueError: the real reason\n"))
    with pytest.raises(KbenchError, match=r"^ONNX conversion failed: ValueError: the real reason$"):
        convert()
    assert convert_module.signal_name(99) == "signal 99"


def test_the_conversion_child_starts_with_the_gpus_hidden(tmp_path, monkeypatch):
    """It never runs the graph, so its TensorFlow must not map GPU memory beside the JAX parent."""
    import subprocess

    seen = {}

    def run(command, env, **_):
        seen.update(env)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(convert_module.subprocess, "run", run)
    convert_module.convert_in_tensorflow_process("m.keras", str(tmp_path / "m.onnx"), 17, None)
    assert seen["CUDA_VISIBLE_DEVICES"] == "" and seen["KERAS_BACKEND"] == "tensorflow"
