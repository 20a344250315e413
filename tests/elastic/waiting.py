"""Waiting helpers and checks shared by the elastic tests that run real processes."""
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


async def fell_back(replica, url: str, standby_pid: int, records) -> None:
    """A replica whose standby had died serves from a fresh worker, and one log line said so."""
    import asyncio

    from foundry_sglang.elastic.workers import http_ok

    await asyncio.get_running_loop().run_in_executor(
        None, lambda: wait_until(lambda: http_ok(url + "/health"), what="fallback worker healthy"))
    assert replica.pid != standby_pid and not replica.from_standby
    [line] = [r.getMessage() for r in records if "unusable" in r.getMessage()]
    assert f"standby pid {standby_pid}" in line and "exited" in line and "\n" not in line
