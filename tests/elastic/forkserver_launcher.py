"""A stand-in for SGLang's launcher process (run as a script by test_elastic_standby_sglang.py).

It warms the forkserver as a standby does (one of its modules wants CUDA at import), sets an environment
variable afterwards (as the launcher sets FOUNDRY_MODE), forces ``spawn`` as SGLang's ``_set_envs_and_config``
does, applies the standby's hook body and starts processes with plain ``multiprocessing.Process``, as SGLang
does. Prints one JSON line, then waits.
"""
import json
import multiprocessing as mp
import os
import sys
import time


def report(conn):
    conn.send({"pid": os.getpid(), "ppid": os.getppid(), "mode": os.environ.get("FOUNDRY_MODE"),
               "preloaded": "foundry_sglang.graphs.keys" in sys.modules})
    conn.close()
    time.sleep(600)


def start(name):
    reader, writer = mp.Pipe(duplex=False)
    p = mp.Process(target=report, args=(writer,), name=name, daemon=False)
    p.start()
    writer.close()
    return reader.recv()


if __name__ == "__main__":
    from foundry_sglang.plugin import forkserver

    modules = ["torch", "json", "foundry_sglang.graphs.keys", "cuda_at_import", "no_such_module_here"]
    warm = forkserver.wait_warm(forkserver.start(modules))
    os.environ["FOUNDRY_MODE"] = "load"
    mp.set_start_method("spawn", force=True)
    forkserver.use_forkserver()
    forked = start("scheduler")
    os.environ["LD_LIBRARY_PATH"] = os.environ.get("LD_LIBRARY_PATH", "") + ":/nonexistent"
    spawned = start("scheduler-after-ld-change")
    print(json.dumps({"warm": warm, "launcher": os.getpid(), "forkserver": forkserver.forkserver_pid(),
                      "forked": forked, "spawned": spawned}), flush=True)
    time.sleep(600)
