import subprocess
import sys
import textwrap

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
