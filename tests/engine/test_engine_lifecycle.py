"""The engine server's supervisor watch: an orphaned server shuts itself down."""
import os
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_server_exits_when_its_parent_dies(tmp_path):
    marker = tmp_path / "child.pid"
    child = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {ROOT!r})
        from foundry_sglang.proc import exit_with_parent
        signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r} + ".term", "w").close(), os._exit(0)))
        open({str(marker)!r}, "w").write(str(os.getpid()))
        exit_with_parent(poll_s=0.05)
        time.sleep(30)
    """)
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {child!r}])
        while not __import__("os").path.exists({str(marker)!r}):
            time.sleep(0.05)
    """)
    subprocess.run([sys.executable, "-c", parent], timeout=60, check=True)  # the parent exits here
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not os.path.exists(str(marker) + ".term"):
        time.sleep(0.1)
    assert os.path.exists(str(marker) + ".term"), "orphaned child did not get SIGTERM"
