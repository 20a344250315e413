"""Bad input and failures around switches, with real engine processes on CPU (built-in engine, gloo).

The ``sglang`` worker kind here runs ``python -m foundry_sglang.launch`` (and its standby) for real; on CPU the
launcher serves the ``builtin:`` preset with the built-in engine, so the SGLang-kind process paths are the real
ones while the answers come from an engine that runs here. Replacement times are printed (``-s``), not asserted.
"""
import os
import signal
import time

import pytest
import requests
from elastic_load import LoadGenerator, reference_outputs
from waiting import gone, wait_until

from foundry_sglang.elastic.backends import LocalBackend
from foundry_sglang.elastic.deployment import DeploymentConfig, ElasticDeployment
from foundry_sglang.elastic.layout import LayoutError
from foundry_sglang.elastic.workers import WorkerSpec

ENGINE_ARGS = ["--num-kv-pages", "256", "--max-running-requests", "8"]
ENV = {"OMP_NUM_THREADS": "1"}


def replica_pids(dep):
    return [r["pid"] for g in dep.status()["generations"] for r in g["replicas"]]


def config(tmp_path, **kw):
    base = dict(model="builtin:tiny", slots=2, tp=1, replicas=1, backend="local", port=0, device="cpu",
                log_dir=str(tmp_path), extra_args=ENGINE_ARGS, env=ENV, start_timeout=120, queue_timeout=240)
    return DeploymentConfig(**dict(base, **kw))


def check_refused_before_anything_stops(dep, target, needle):
    before = dep.status()
    with pytest.raises(LayoutError) as info:
        dep.reconfigure(**target)
    msg = str(info.value)
    print(f"\n  refused: {msg}")
    assert needle in msg and "\n" not in msg
    after = dep.status()
    assert after["generations"] == before["generations"] and after["switches"] == before["switches"]
    r = requests.post(dep.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_switch_to_more_slots_than_the_backend_has_is_refused_before_anything_stops(tmp_path):
    # The deployment was declared with 4 slots but the backend was given only GPUs 0 and 1.
    with ElasticDeployment(config(tmp_path, slots=4, gpu_ids=[0, 1])) as dep:
        check_refused_before_anything_stops(dep, {"tp": 2, "replicas": 2}, "the local backend has 2 slot(s) [0, 1]")


@pytest.mark.slow
def test_switch_to_more_slots_than_the_ray_cluster_has_is_refused_before_anything_stops(tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with ElasticDeployment(config(tmp_path, slots=4, backend="ray")) as dep:
            check_refused_before_anything_stops(dep, {"tp": 2, "replicas": 2}, "the Ray cluster has 2 CPU")
    finally:
        ray.shutdown()


def test_standby_that_never_warms_up_is_not_restarted_forever(tmp_path, caplog):
    backend = LocalBackend([0], standby=1)
    spec = WorkerSpec(model="builtin:tiny", device="bogus", env=ENV,       # every standby exits at once
                      log_path=str(tmp_path / "standby-{slot}.log"))
    with caplog.at_level("WARNING", logger="foundry_sglang.elastic.backends"):
        for _ in range(3):
            assert backend.replenish(spec) == 1
            wait_until(lambda: backend.standbys[0].returncode() is not None, what="standby exit")
        assert backend.replenish(spec) == 0 and backend.replenish(spec) == 0
    status = backend.standby_status()
    assert status["started"] == 3 and status["workers"] == [] and backend.free == [0]
    assert "3 standby workers in a row exited before they were warm" in status["disabled"]
    assert sum("no more standby workers" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind, target", [("builtin", {"replicas": 2}), ("sglang", {"tp": 2})])
def test_new_worker_that_never_becomes_healthy_rolls_back_with_zero_failed_requests(tmp_path, kind, target):
    with ElasticDeployment(config(tmp_path, kind=kind, start_timeout=20)) as dep:
        first = set(replica_pids(dep))
        with LoadGenerator(dep.url, reference_outputs(dep.url), concurrency=3) as load:
            job = dep.reconfigure(wait=False, **target)
            wait_until(lambda: set(replica_pids(dep)) - first - {None}, what="new worker started")
            [new] = set(replica_pids(dep)) - first - {None}
            os.kill(new, signal.SIGSTOP)             # alive, but it never answers /health
            while job["state"] == "running":
                time.sleep(0.2)
                job = dep.job(job["id"])
            served = load.ok
            wait_until(lambda: load.ok > served + 3, what="requests served after the rollback")
        print(f"\n  {kind} {target}: {job['state']} ({job['strategy']}) {job['phases_s']}; "
              f"{load.ok} ok, {len(load.failures)} failed")
        assert job["state"] == "rolled_back" and "not healthy within" in job["error"], job
        assert dep.status()["layout"] == {"tp": 1, "ep": 1, "replicas": 1}
        assert not load.failures, load.failures[:3]
        wait_until(lambda: gone(new), timeout=30, what="the hung worker stopped")


@pytest.mark.slow
def test_sglang_replica_killed_outside_a_switch_is_replaced(tmp_path):
    with ElasticDeployment(config(tmp_path, kind="sglang", replicas=2)) as dep:
        with LoadGenerator(dep.url, reference_outputs(dep.url), concurrency=3) as load:
            victim = replica_pids(dep)[0]
            t0 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: dep.status()["restarts"] == 1 and dep.status()["state"] == "serving"
                       and victim not in replica_pids(dep) and len(replica_pids(dep)) == 2, what="replacement")
            replaced_s = time.monotonic() - t0
            served = load.ok
            wait_until(lambda: load.ok > served + 3, what="requests served after the replacement")
        print(f"\n  sglang-kind replica SIGKILLed outside a switch: replaced and serving after {replaced_s:.1f}s; "
              f"{load.ok} ok, {len(load.failures)} failed")
        assert not load.failures, load.failures[:3]
        health = requests.get(dep.url + "/health", timeout=10).json()
        assert health["status"] == "ok" and health["live_replicas"] == 2 and health["restarts"] == 1
