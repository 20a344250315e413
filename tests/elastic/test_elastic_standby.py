"""Standby engines: warm processes that take a layout later (real engine processes on CPU, gloo)."""
import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
import requests
from waiting import fell_back, wait_until

from foundry_sglang.elastic.backends import LocalBackend
from foundry_sglang.elastic.deployment import DeploymentConfig, ElasticDeployment
from foundry_sglang.elastic.launch import build_parser, config_from_args, main
from foundry_sglang.elastic.layout import Layout
from foundry_sglang.elastic.workers import ProcessWorker, WorkerSpec, http_ok
from foundry_sglang.engine.flags import build_arg_parser
from foundry_sglang.engine.standby import StandbyMessageError, parse_message

ENGINE_ARGS = ["--num-kv-pages", "256"]
ENV = {"OMP_NUM_THREADS": "1"}
BODY = {"prompt": "standby", "max_tokens": 6, "temperature": 0}


def replica_pids(dep):
    return {r["pid"]: r for g in dep.status()["generations"] for r in g["replicas"]}


def test_standby_message_is_checked():
    assert parse_message('{"argv": ["--model", "builtin:tiny"]}') == ["--model", "builtin:tiny"]
    for bad, why in (("not json", "not JSON"), ('["--tp"]', "nothing else"), ('{"argv": [1]}', "strings"),
                     ('{"argv": [], "x": 1}', "nothing else"), ('{"argv": ["--standby"]}', "another standby"),
                     ('{"argv": ["--standb"]}', "another standby"), ('{"argv": ["--stand=1"]}', "another standby"),
                     ('{"argv": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
                     ('{"argv": [' + "1" * 5000 + "]}", "more than 4300 digits")):
        with pytest.raises(StandbyMessageError, match=why):
            parse_message(bad)
    # Nor does the server's own parser take a prefix for the flag.
    with pytest.raises(SystemExit):
        build_arg_parser().parse_args(["--standb"])


def test_standby_process_becomes_a_tp2_server(tmp_path):
    spec = WorkerSpec(model="builtin:tiny", tp=2, device="cpu", extra_args=ENGINE_ARGS, env=ENV,
                      log_path=str(tmp_path / "standby.log"))
    w = ProcessWorker()
    w.start_standby(spec)
    try:
        wait_until(w.standby_ready, what="standby warm")
        pid = w.pid
        url = w.activate(spec)
        wait_until(lambda: http_ok(url + "/health"), what="activated standby healthy")
        assert w.pid == pid and w.returncode() is None      # the warm process itself serves
        out = requests.post(url + "/v1/completions", json=BODY, timeout=60).json()
        assert out["usage"]["completion_tokens"] == 6
        assert not w.standby_ready()                          # serving now, no longer a standby
    finally:
        w.stop()
    log = (tmp_path / "standby.log").read_text()
    assert "standby warm" in log and "arguments received" in log


def test_standby_exits_at_end_of_input_and_with_its_parent():
    spec = WorkerSpec(model="builtin:tiny", device="cpu", env=ENV)
    w = ProcessWorker()
    w.start_standby(spec)
    wait_until(w.standby_ready, what="standby warm")
    w.proc.stdin.close()                       # the parent has nothing for it: it leaves by itself
    assert w.proc.wait(30) == 0
    # A standby whose parent dies goes too (FOUNDRY_EXIT_WITH_PARENT, set by build_env).
    code = ("import time; from foundry_sglang.elastic.workers import ProcessWorker, WorkerSpec; "
            "w = ProcessWorker(); w.start_standby(WorkerSpec(model='builtin:tiny', env={'OMP_NUM_THREADS': '1'})); "
            "print(w.pid, flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.getcwd()), stdin=subprocess.DEVNULL)
    child = int(parent.stdout.readline())
    time.sleep(1.0)
    parent.kill()
    parent.wait()

    def gone():
        try:
            os.kill(child, 0)
            return False
        except ProcessLookupError:
            return True
    wait_until(gone, timeout=30, what="standby exit after its parent died")


@pytest.mark.parametrize("kind", ["builtin", pytest.param("sglang", marks=pytest.mark.slow)])
def test_dead_standby_falls_back_to_a_fresh_worker_and_is_replaced(kind, caplog):
    if kind == "sglang":
        pytest.importorskip("sglang.srt.server_args")
    backend = LocalBackend([0, 1], standby=1)
    spec = WorkerSpec(model="builtin:tiny", kind=kind, device="cpu", extra_args=ENGINE_ARGS, env=ENV)

    async def scenario():
        assert backend.replenish(spec) == 1 and backend.free == [1]
        standby = backend.standbys[0]
        os.kill(standby.pid, signal.SIGKILL)
        standby.proc.wait(10)
        [replica] = await backend.allocate(2, Layout(1, 1, 1), lambda i: spec)
        with caplog.at_level("WARNING", logger="foundry_sglang.elastic.backends"):
            url = await replica.start()
        try:
            await fell_back(replica, url, standby.pid, caplog.records)
            assert backend.standby_status()["fallbacks"] == 1
            assert backend.replenish(spec) == 1 and backend.standby_status()["started"] == 2   # replaced
        finally:
            await replica.stop()
            await backend.shutdown()
        assert sorted(backend.free) == [0, 1]
    asyncio.run(scenario())


def test_deployment_scales_onto_its_standby_and_refills_the_pool(tmp_path):
    cfg = DeploymentConfig(model="builtin:tiny", slots=2, tp=1, replicas=1, backend="local", port=0,
                           log_dir=str(tmp_path), extra_args=ENGINE_ARGS, env=ENV, start_timeout=120, standby=1)
    with ElasticDeployment(cfg) as dep:
        wait_until(lambda: dep.status()["standby"]["ready"] == 1, what="standby warm")
        st = dep.status()["standby"]
        assert st["target"] == 1 and [w["slot"] for w in st["workers"]] == [1]
        standby_pid = st["workers"][0]["pid"]
        assert standby_pid not in replica_pids(dep)                  # never serving capacity
        assert requests.get(dep.url + "/health", timeout=10).json()["live_replicas"] == 1
        metrics = requests.get(dep.url + "/metrics", timeout=10).text
        assert "foundry_elastic_standby_workers 1" in metrics and "foundry_elastic_standby_target 1" in metrics

        job = dep.reconfigure(replicas=2)
        assert job["state"] == "succeeded", job
        replicas = replica_pids(dep)
        assert standby_pid in replicas and replicas[standby_pid]["from_standby"]
        assert dep.status()["standby"]["workers"] == []              # both slots serve: no room for one
        before = requests.post(dep.url + "/v1/completions", json=BODY, timeout=60).json()["choices"][0]["text"]

        job = dep.reconfigure(replicas=1)
        assert job["state"] == "succeeded", job
        wait_until(lambda: dep.status()["standby"]["ready"] == 1, what="pool refilled")
        st = dep.status()["standby"]
        assert st["used"] == 1 and st["started"] == 2 and st["fallbacks"] == 0
        metrics = requests.get(dep.url + "/metrics", timeout=10).text
        assert "foundry_elastic_standby_used_total 1" in metrics
        after = requests.post(dep.url + "/v1/completions", json=BODY, timeout=60).json()["choices"][0]["text"]
        assert after == before
        pool = [w["pid"] for w in st["workers"]]
    for pid in pool:                                                 # stopped with the deployment
        wait_until(lambda: subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0,
                   timeout=20, what="standby stopped")


def test_standby_flag_and_its_limits():
    args = build_parser().parse_args(["--device", "cpu", "--backend", "local", "--standby", "2"])
    assert config_from_args(args, []).standby == 2
    assert config_from_args(build_parser().parse_args(["--device", "cpu"]), []).standby == 0
    assert config_from_args(build_parser().parse_args(["--device", "cpu", "--standby", "1"]), []).standby == 1  # Ray
    assert main(["--device", "cpu", "--standby", "1", "--standby-coreside"]) == 2   # Ray: one line, exit 2
    assert main(["--device", "cpu", "--backend", "local", "--standby", "-1"]) == 2
    with pytest.raises(ValueError, match="standby_coreside needs standby >= 1 and backend 'local'"):
        DeploymentConfig(model="builtin:tiny", backend="ray", standby=1, standby_coreside=True)
    assert main(["--device", "cpu", "--backend", "local", "--standby-coreside"]) == 2       # needs --standby N
    assert config_from_args(build_parser().parse_args(["--device", "cpu", "--backend", "local", "--standby", "1",
                                                       "--standby-coreside"]), []).standby_coreside
    with pytest.raises(ValueError, match="standby_coreside needs standby"):
        DeploymentConfig(model="builtin:tiny", backend="local", standby_coreside=True)


def test_a_coresident_standby_waits_on_a_serving_slot_and_takes_the_next_layout(tmp_path):
    """TP=2 holds both slots: with ``standby_coreside`` the pool still keeps a warm engine, on a serving slot, and
    the switch to TP=1 hands it the new layout instead of starting a process."""
    cfg = DeploymentConfig(model="builtin:tiny", slots=2, tp=2, replicas=1, backend="local", port=0,
                           log_dir=str(tmp_path), extra_args=ENGINE_ARGS, env=ENV, start_timeout=180, standby=1,
                           standby_coreside=True)
    with ElasticDeployment(cfg) as dep:
        wait_until(lambda: dep.status()["standby"]["ready"] == 1, timeout=180, what="co-resident standby warm")
        [worker] = dep.status()["standby"]["workers"]
        assert worker["coresident"] and worker["slot"] in (0, 1) and worker["pid"] not in replica_pids(dep)
        before = requests.post(dep.url + "/v1/completions", json=BODY, timeout=60).json()["choices"][0]["text"]

        job = dep.reconfigure(tp=1)
        assert job["state"] == "succeeded", job
        replicas = replica_pids(dep)
        assert list(replicas) == [worker["pid"]] and replicas[worker["pid"]]["from_standby"]
        after = requests.post(dep.url + "/v1/completions", json=BODY, timeout=60).json()["choices"][0]["text"]
        assert after == before
        # TP=1 leaves a slot free: the pool refills there, not beside the server
        wait_until(lambda: dep.status()["standby"]["ready"] == 1, timeout=180, what="pool refilled")
        [refill] = dep.status()["standby"]["workers"]
        assert not refill["coresident"] and refill["slot"] != replicas[worker["pid"]]["slots"][0]


def test_coreside_accounting_never_gives_a_serving_slot_twice():
    """Slots: a standby on a serving slot is neither free nor usable until the replica there stops; when it
    stops, the slot is the standby's, not free; a standby that exits leaves a serving slot serving."""
    backend = LocalBackend([0, 1], standby=1, coreside=True)
    spec = WorkerSpec(model="builtin:tiny", device="cpu", extra_args=ENGINE_ARGS, env=ENV)

    async def scenario():
        [replica] = await backend.allocate(1, Layout(2, 1, 1), lambda i: spec)
        assert backend.free == [] and backend.held == {0, 1}
        assert backend.replenish(spec) == 1 and list(backend.standbys) == [0]
        with pytest.raises(Exception, match="needs 1 slots, 0 free"):
            await backend.allocate(2, Layout(1, 1, 1), lambda i: spec)
        standby = backend.standbys[0]
        os.kill(standby.pid, signal.SIGKILL)
        standby.proc.wait(10)
        assert backend.replenish(spec) == 1 and list(backend.standbys) == [0] and backend.free == []
        backend._give_back(replica.slots)            # the TP=2 replica stopped (it never started here)
        assert backend.free == [1] and backend.held == set()
        [tp1] = await backend.allocate(3, Layout(1, 1, 1), lambda i: spec)
        assert tp1.slots == [0] and tp1.standby is not None and backend.free == [1]
        await backend.shutdown()
        backend._give_back(tp1.slots)
        tp1.standby.stop()
        assert backend.free == [0, 1] and not backend.standbys
    asyncio.run(scenario())


def test_replicas_from_standbys_that_never_become_healthy_turn_the_pool_off(caplog):
    """A standby that takes its layout and then cannot serve it (here: a model that does not exist) is counted;
    after two in a row no standby is used or kept, and the next replica starts a fresh worker."""
    backend = LocalBackend([0, 1], standby=1)
    spec = WorkerSpec(model="builtin:tiny", device="cpu", extra_args=ENGINE_ARGS, env=ENV)
    broken = WorkerSpec(model="builtin:no-such-preset", device="cpu", extra_args=ENGINE_ARGS, env=ENV)

    async def failed_activation(gen):
        assert backend.replenish(spec) == 1
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: wait_until(lambda: all(w.standby_ready() for w in backend.standbys.values()),
                                     timeout=120, what="standby warm"))
        [replica] = await backend.allocate(gen, Layout(1, 1, 1), lambda i: broken)
        with caplog.at_level("WARNING", logger="foundry_sglang.elastic.backends"):
            await replica.start()
            assert replica.from_standby
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: wait_until(lambda: replica.worker.returncode() is not None, timeout=120,
                                         what="the activated standby exits"))
            await replica.stop()                     # what the controller does when a start fails

    async def scenario():
        await failed_activation(1)
        assert backend.standby_status()["never_healthy"] == 1 and not backend.standby_disabled
        await failed_activation(2)
        st = backend.standby_status()
        assert st["never_healthy"] == 2 and "2 replicas in a row started from standby workers" in st["disabled"]
        assert backend.replenish(spec) == 0 and not backend.standbys     # none started, none kept
        [fresh] = await backend.allocate(3, Layout(1, 1, 1), lambda i: spec)
        assert fresh.standby is None
        await backend.shutdown()
        backend._give_back(fresh.slots)
        assert sorted(backend.free) == [0, 1]
        lines = [r.getMessage() for r in caplog.records if "never became healthy" in r.getMessage()]
        assert len(lines) == 3 and all("\n" not in line for line in lines)
    asyncio.run(scenario())
