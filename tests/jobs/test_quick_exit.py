"""The `rayquant` command leaves without the interpreter's teardown, yet as `sys.exit` would otherwise:
exit code, flushed output, atexit functions; a working thread that is not a daemon is waited for."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# a module global whose finalizer prints only when the interpreter tears its modules down
PROLOGUE = textwrap.dedent("""
    import atexit, sys, threading, time
    class Teardown:
        def __del__(self):
            print("teardown ran", flush=True)
    keep = Teardown()
    atexit.register(lambda: print("atexit ran"))  # unflushed: the exit must flush it
""")


def _run(body: str, *args: str) -> subprocess.CompletedProcess:
    code = PROLOGUE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_the_command_exits_with_its_code_its_output_and_atexit_but_no_teardown(tmp_path):
    out = _run("""
        sys.argv = ["rayquant", "plan", sys.argv[1]]
        from rayquant.jobs.cli import run
        run()
    """, str(tmp_path / "missing.yaml"))
    assert out.returncode == 2
    assert "error: SpecError: spec file" in out.stderr
    assert "atexit ran" in out.stdout
    assert "teardown ran" not in out.stdout


def test_a_working_thread_that_is_not_a_daemon_is_waited_for(tmp_path):
    done = tmp_path / "done"
    out = _run("""
        def work():
            time.sleep(1.0)
            open(sys.argv[1], "w").write("written")
        threading.Thread(target=work).start()
        from rayquant.jobs.quick_exit import exit_without_teardown
        exit_without_teardown(3)
    """, str(done))
    assert out.returncode == 3
    assert done.read_text() == "written"
    assert "atexit ran" in out.stdout
