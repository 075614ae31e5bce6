import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO

# A SIGTERM that arrives while a garbage-collection callback runs (JAX registers one): Python can't
# raise its KeyboardInterrupt there and would print "Exception ignored in ..." and go on.
SIGTERM_IN_A_GC_CALLBACK = textwrap.dedent(
    """
    import gc, os, signal, time
    from kbench.core.process import set_up

    set_up()
    def slow_callback(phase, info):
        if phase == "start":  # the signal arrives while the callback runs, however loaded the machine
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
    gc.callbacks.append(slow_callback)
    try:
        gc.collect()
        time.sleep(5)
        print("went on")
    except KeyboardInterrupt:
        print("stopped")
    """
)


def test_a_stop_request_swallowed_by_a_gc_callback_still_stops_at_once_and_quietly():
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_IN_A_GC_CALLBACK], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.stdout.strip() == "stopped" and done.stderr == "", done.stderr


def test_exit_now_keeps_the_status_and_what_was_printed():
    script = "from kbench.core.process import exit_now; print('written', end=''); exit_now(143)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (143, "written", "")


def test_exit_now_runs_the_registered_exit_hooks_first_even_when_one_fails():
    # a study's local Ray registers ray.shutdown this way (kbench.study.executors)
    script = (
        "from kbench.core.process import at_exit_now, exit_now\n"
        "at_exit_now(lambda: print('first registered', flush=True))\n"
        "at_exit_now(lambda: 1 / 0)\n"
        "at_exit_now(lambda: print('last registered', flush=True))\n"
        "exit_now(130)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (130, "last registered\nfirst registered\n", "")


def test_a_childs_death_is_one_line():
    from kbench.core.process import child_death

    assert child_death(0, "noise") is None
    assert child_death(-9, "half a line") == "its process was killed by SIGKILL (signal 9) (out of memory?)"
    assert child_death(-15, "") == "its process was killed by SIGTERM (signal 15)"
    assert child_death(-99, "") == "its process was killed by signal 99"
    assert child_death(1, "Traceback\n  ...\nValueError: boom\n\n") == "ValueError: boom"
    assert child_death(2, "", silent="no message") == "no message"
    assert child_death(3, "why\n", status=True) == "its process exited 3: why"


def test_orphan_proof_runs_the_command_and_reports_one_that_cannot_start():
    from kbench.core.process import orphan_proof

    done = subprocess.run(
        orphan_proof([sys.executable, "-c", "print('ran')"]), capture_output=True, text=True, cwd=REPO
    )
    assert (done.returncode, done.stdout) == (0, "ran\n")
    missing = subprocess.run(orphan_proof(["no-such-command-kbench"]), capture_output=True, text=True, cwd=REPO)
    assert (
        missing.returncode == 127
        and missing.stderr == "kbench: can't start no-such-command-kbench: No such file or directory\n"
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_parent_leaves_no_conversion_subprocess_behind(tmp_path):
    """The ONNX conversion subprocess dies with kbench, even when kbench is killed with -9. The child
    asks for it first thing, as the conversion does (kbench.export.convert._main), and says so in pid_file."""
    pid_file = tmp_path / "child.pid"
    child_code = (
        "import os, sys, time; from kbench.core.process import die_with_parent; "
        f"die_with_parent(int(sys.argv[1])); open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, subprocess, sys; subprocess.run([sys.executable, '-c', {child_code!r}, str(os.getpid())])",
        ]
    )
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its killed parent")
