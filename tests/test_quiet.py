"""A quiet terminal: nothing but kbench's own lines on stderr unless -v, and never a lost crash."""

import os
import subprocess
import sys

import pytest

from conftest import BACKEND, REPO, run_cli


def _foreign_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("kbench:")]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from kbench.data.synthetic import write_kaggle_dataset

    return write_kaggle_dataset(str(tmp_path_factory.mktemp("quiet")), n_train=40, n_test=4, image_size=24, seed=3)


# What many shells export to quieten TensorFlow; it still lets "E0000 ... failed call to cuInit" through.
SHELL = {"TF_CPP_MIN_LOG_LEVEL": "2", "KBENCH_VERBOSE": ""}


def test_train_and_export_write_only_kbench_lines_to_stderr(small_data, tmp_path):
    run_dir = str(tmp_path / "run")
    trained = run_cli(
        "train",
        "--backend",
        BACKEND,
        "--backbone",
        "small_cnn",
        "--data",
        small_data["train"],
        "--image-size",
        "24",
        "--epochs",
        "1",
        "--run-dir",
        run_dir,
        "--quiet",
        env=SHELL,
    )
    assert trained.returncode == 0, trained.stderr
    assert _foreign_lines(trained.stderr) == []
    # Under JAX the conversion runs in a TensorFlow subprocess; under TensorFlow in this process.
    model = os.path.join(run_dir, "model.keras")
    exported = run_cli("export", "onnx", model, "-o", str(tmp_path / "m.onnx"), "--backend", BACKEND, env=SHELL)
    assert exported.returncode == 0 and "wrote" in exported.stdout, exported.stderr
    assert _foreign_lines(exported.stderr) == []
    # The same export with -v shows TensorFlow's start-up lines: the silence above is kbench's doing.
    loud = run_cli("-v", "export", "onnx", model, "-o", str(tmp_path / "v.onnx"), "--backend", BACKEND, env=SHELL)
    assert loud.returncode == 0 and _foreign_lines(loud.stderr), loud.stderr


def _python(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    """Run ``code`` with a stand-in ``tensorflow`` package (tmp_path/fake) ahead of the real one."""
    path = os.pathsep.join([REPO, str(tmp_path / "fake")])
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": path, "KBENCH_VERBOSE": "", **env},
    )


def _fake_tensorflow(tmp_path, body: str) -> None:
    package = tmp_path / "fake" / "tensorflow"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import os\nos.write(2, b'I0000 start-up chatter\\n')\n" + body)


IMPORT = (
    "import kbench.core.quiet, sys; kbench.core.quiet.set_up(); print('kbench: before', file=sys.stderr)\n"
    "import tensorflow\n"
)


def test_keras_user_warnings_are_kept_off_stderr_and_kbench_s_are_not():
    code = (
        "import warnings; from kbench.core.quiet import set_up; set_up(); "
        "warnings.warn_explicit('keras advice', UserWarning, 'trainer.py', 1, module='keras.src.trainers.trainer'); "
        "warnings.warn_explicit('kbench note', UserWarning, 'train.py', 1, module='kbench.training.train')"
    )
    for verbose, shown in (("", ["kbench note"]), ("1", ["keras advice", "kbench note"])):
        env = {**os.environ, "PYTHONPATH": REPO, "KBENCH_VERBOSE": verbose, "PYTHONWARNINGS": ""}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0 and [m for m in ("keras advice", "kbench note") if m in done.stderr] == shown


def test_start_up_chatter_is_held_and_verbose_shows_it(tmp_path):
    _fake_tensorflow(tmp_path, "LOADED = True\n")
    code = IMPORT + "print('kbench: after', file=sys.stderr); print(tensorflow.LOADED, tensorflow.__loader__)"
    quiet = _python(code, tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == "kbench: before\nkbench: after\n"
    assert quiet.stdout.startswith("True <_frozen_importlib_external.SourceFileLoader")  # the real loader
    loud = _python(code, tmp_path, KBENCH_VERBOSE="1")
    assert loud.stderr == "kbench: before\nI0000 start-up chatter\nkbench: after\n"


def test_a_failed_import_shows_what_was_held_then_the_error(tmp_path):
    _fake_tensorflow(tmp_path, "os.write(2, b'E0000 libcudnn.so.9: cannot open\\n')\nraise ImportError('no cudnn')\n")
    done = _python(IMPORT, tmp_path)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[:3] == ["kbench: before", "I0000 start-up chatter", "E0000 libcudnn.so.9: cannot open"]
    assert lines[-1] == "ImportError: no cudnn"
    after = _python(
        IMPORT.replace(
            "import tensorflow\n",
            "try:\n    import tensorflow\nexcept ImportError:\n"
            "    pass\nprint('kbench: fd 2 is back', file=sys.stderr)\n",
        ),
        tmp_path,
    )
    assert after.stderr.splitlines()[-1] == "kbench: fd 2 is back"


def test_a_crash_while_importing_still_shows_its_reason(tmp_path):
    _fake_tensorflow(tmp_path, "os.write(2, b'F0000 Check failed: AVX not available\\n')\nos.abort()\n")
    done = _python(IMPORT, tmp_path)
    assert done.returncode < 0  # killed by SIGABRT
    assert "F0000 Check failed: AVX not available" in done.stderr  # replayed by the keeper process
    assert "Fatal Python error: Aborted" in done.stderr and "tensorflow" in done.stderr  # faulthandler's stack


NESTED_REDIRECTIONS = """
import os, sys, threading
from kbench.core.quiet import held_stderr, output_to, redirected
with open(sys.argv[1], "w") as log:
    with output_to(log):
        os.write(2, b"logged before;")
        with held_stderr():
            os.write(2, b"held;")
        os.write(2, b"logged after;")
        print("printed;", end="")
os.write(2, b"terminal")
first, second = open(os.devnull, "w"), open(os.devnull, "w")
outer = redirected(first.fileno()); inner = redirected(second.fileno())
outer.__enter__(); inner.__enter__()
try:
    outer.__exit__(None, None, None)
except RuntimeError as error:
    print(" out of turn:", error)
"""


@pytest.mark.once
def test_stderr_redirections_nest_and_one_ended_out_of_turn_is_refused(tmp_path):
    log = tmp_path / "task.log"
    done = subprocess.run(
        [sys.executable, "-c", NESTED_REDIRECTIONS, str(log)], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert log.read_text() == "logged before;logged after;printed;"
    assert done.stderr == "terminal"
    assert "out of turn: file descriptor redirections ended out of turn" in done.stdout
