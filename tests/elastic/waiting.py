"""Waiting helpers shared by the elastic tests that run real processes."""
import os
import time


def wait_until(predicate, timeout=120.0, what="condition"):
    """Poll ``predicate`` until it is true; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout:.0f}s")


def gone(pid: int) -> bool:
    """True once process ``pid`` no longer exists."""
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        return True
