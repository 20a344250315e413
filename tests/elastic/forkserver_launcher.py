"""A stand-in for SGLang's launcher process (run as a script by test_elastic_standby_sglang.py).

It warms the forkserver as a standby does (one of its modules wants CUDA at import), sets an environment
variable afterwards (as the launcher sets FOUNDRY_MODE), forces ``spawn`` as SGLang's ``_set_envs_and_config``
does, applies the standby's hook body and starts processes with plain ``multiprocessing.Process``, as SGLang
does. Prints one JSON line, then waits.
"""
import json
import multiprocessing as mp
import os
import resource
import signal
import sys
import time


def report(conn, crash=False):
    conn.send({"pid": os.getpid(), "ppid": os.getppid(), "mode": os.environ.get("FOUNDRY_MODE"),
               "preloaded": "foundry_sglang.graphs.keys" in sys.modules,
               "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]})
    conn.close()
    if crash:  # as SGLang's scheduler reports an exception: SIGQUIT to its parent process
        os.kill(os.getppid(), signal.SIGQUIT)
    time.sleep(600)


def start(name, crash=False):
    reader, writer = mp.Pipe(duplex=False)
    p = mp.Process(target=report, args=(writer, crash), name=name, daemon=False)
    p.start()
    writer.close()
    return reader.recv()


if __name__ == "__main__":
    from foundry_sglang.plugin import forkserver

    modules = ["torch", "json", "foundry_sglang.graphs.keys", "cuda_at_import", "no_such_module_here"]
    warm = forkserver.wait_warm(forkserver.start(modules))
    os.environ["FOUNDRY_MODE"] = "load"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)   # as SGLang's set_ulimit, after the forkserver started
    nofile = soft - 1 if soft > 64 else soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
    quits = []
    signal.signal(signal.SIGQUIT, lambda *_: quits.append(time.monotonic()))
    mp.set_start_method("spawn", force=True)
    forkserver.use_forkserver()
    forked = start("scheduler", crash=True)
    for _ in range(100):
        if quits:
            break
        time.sleep(0.05)
    method = mp.get_start_method()            # SGLang asserts "spawn" before it swaps the executable
    wrapper = os.path.join(os.environ["TMPDIR_FOR_TEST"], "numactl-like.sh")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    os.chmod(wrapper, 0o755)
    mp.spawn.set_executable(wrapper)          # as SGLang's NUMA binding does around a rank's start
    wrapped = start("scheduler-numa-bound")
    mp.spawn.set_executable(sys.executable)
    os.environ["LD_LIBRARY_PATH"] = os.environ.get("LD_LIBRARY_PATH", "") + ":/nonexistent"
    spawned = start("scheduler-after-ld-change")
    try:
        os.kill(forkserver.forkserver_pid(), 0)
        alive = True
    except ProcessLookupError:
        alive = False
    print(json.dumps({"warm": warm, "launcher": os.getpid(), "forkserver": forkserver.forkserver_pid(),
                      "forked": forked, "spawned": spawned, "nofile": nofile, "sigquit": bool(quits),
                      "start_method": method, "wrapped": wrapped,
                      "forkserver_alive": alive}), flush=True)
    time.sleep(600)
