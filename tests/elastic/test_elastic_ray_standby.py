"""Standby workers on the Ray backend (a real local Ray cluster, the built-in engine on CPU).

A standby is an engine actor holding one slot in a placement group of its own. A replica allocated while it
waits is handed to it (rank 0), with its other ranks' slots reserved on the standby's node. The cluster also
declares four GPUs, with no CUDA behind them, so that Ray's GPU bookkeeping (which ids an actor gets, what
CUDA_VISIBLE_DEVICES it sees) is checked without starting anything on a GPU.
"""
import asyncio
import os
import signal

import pytest
import requests
from elastic_load import LoadGenerator, reference_outputs
from waiting import fell_back, wait_until

from foundry_sglang.elastic.backends import RayBackend, _RayReplica, _RayStandby
from foundry_sglang.elastic.deployment import DeploymentConfig, ElasticDeployment
from foundry_sglang.elastic.layout import Layout
from foundry_sglang.elastic.workers import WorkerSpec, rank_placement

ray = pytest.importorskip("ray")
from ray.util import placement_group_table  # noqa: E402

ENGINE_ARGS = ["--num-kv-pages", "256", "--max-running-requests", "16"]
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def exited(pid):
    """The process is gone (or a zombie no one has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def recovered(dep):
    try:
        return dep.supervise() and dep.status().get("recovered") and dep.status()["state"] == "serving"
    except ray.exceptions.RayActorError:   # still restarting
        return False


def replicas_by_pid(dep):
    return {r["pid"]: r for g in dep.status()["generations"] if g["state"] == "active" for r in g["replicas"]}


def ready_standby(dep):
    wait_until(lambda: dep.status()["standby"]["ready"] == 1, timeout=180, what="Ray standby warm")
    [worker] = dep.status()["standby"]["workers"]
    assert worker["pid"] not in replicas_by_pid(dep)         # never serving capacity
    return worker["pid"]


@pytest.mark.slow
def test_ray_standby_becomes_rank_0_of_the_next_layout_under_load(ray_cluster, tmp_path):
    cfg = DeploymentConfig(model="builtin:tiny", slots=2, tp=1, replicas=1, backend="ray", port=0,
                           log_dir=str(tmp_path), extra_args=ENGINE_ARGS, env=ENV, start_timeout=180,
                           queue_timeout=240, standby=1)
    with ElasticDeployment(cfg) as dep:
        standby = ready_standby(dep)
        reference = reference_outputs(dep.url)
        with LoadGenerator(dep.url, reference) as load:
            job = dep.reconfigure(tp=2)          # rank 0: the standby; rank 1: a slot reserved on its node
            assert job["state"] == "succeeded", job
            [replica] = replicas_by_pid(dep).values()
            assert replica["pid"] == standby and replica["from_standby"]
            assert dep.status()["standby"]["workers"] == []   # TP=2 holds both slots: no room for one

            job = dep.reconfigure(tp=1)          # no standby could wait: a fresh worker
            assert job["state"] == "succeeded", job
            assert not any(r["from_standby"] for r in replicas_by_pid(dep).values())
            standby = ready_standby(dep)         # refilled on the slot TP=2 gave back

            job = dep.reconfigure(replicas=2)
            assert job["state"] == "succeeded", job
            replicas = replicas_by_pid(dep)
            assert standby in replicas and replicas[standby]["from_standby"] and len(replicas) == 2
            done = load.ok
            wait_until(lambda: load.ok >= done + 4, timeout=60, what="requests on the new layout")
        print(f"\n  load: {load.ok} complete responses, {len(load.failures)} failed")
        assert not load.failures, load.failures[:5]
        st = dep.status()["standby"]
        assert st["used"] == 2 and st["fallbacks"] == 0 and st["started"] == 2
        assert "foundry_elastic_standby_used_total 2" in requests.get(dep.url + "/metrics", timeout=10).text

        # A controller crash: Ray restarts it; the standby of the crashed one goes with it, its slot is not
        # lost, and the restarted controller keeps a standby of its own.
        assert dep.reconfigure(replicas=1)["state"] == "succeeded"
        old = ready_standby(dep)
        ray.kill(dep._actor, no_restart=False)
        wait_until(lambda: recovered(dep), timeout=240, what="controller restarted")
        new = ready_standby(dep)
        assert new != old and exited(old)
        live = [g["name"] for g in placement_group_table().values() if g["state"] != "REMOVED"]
        assert sum("standby" in name for name in live) == 1 and len(live) == 2, live


async def tp2_on_a_warm_standby(backend, spec):
    """Start one standby, wait until it is warm, and allocate a TP=2 replica on it (not started)."""
    assert backend.replenish(spec) == 1
    [standby] = backend.standbys
    for _ in range(1800):
        await standby.state_now()
        if standby.ready:
            break
        await asyncio.sleep(0.1)
    assert standby.ready
    [replica] = await backend.allocate(1, Layout(2, 1, 1), lambda i: spec)
    return standby, replica


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["builtin", "sglang"])
def test_ray_standby_that_died_falls_back_to_a_fresh_worker_and_is_replaced(ray_cluster, caplog, kind):
    if kind == "sglang":
        pytest.importorskip("sglang.srt.server_args")
    backend = RayBackend(device="cpu", standby=1, slots=2)
    spec = WorkerSpec(model="builtin:tiny", kind=kind, device="cpu", extra_args=ENGINE_ARGS, env=ENV)

    async def scenario():
        standby, replica = await tp2_on_a_warm_standby(backend, spec)
        assert backend.standbys == [] and backend.held == 2
        os.kill(standby.pid, signal.SIGKILL)     # it dies between the allocation and its layout
        for _ in range(100):                     # its actor has seen it exit
            if (await standby.actor.standby_state.remote())["returncode"] is not None:
                break
            await asyncio.sleep(0.1)
        with caplog.at_level("WARNING", logger="foundry_sglang.elastic.backends"):
            url = await replica.start()
        try:
            await fell_back(replica, url, standby.pid, caplog.records)
            assert backend.standby_status()["fallbacks"] == 1
        finally:
            await replica.stop()
        assert backend.held == 0
        for _ in range(100):                     # the slots are Ray's again, and the pool refills
            if backend.replenish(spec):
                break
            await asyncio.sleep(0.1)
        assert backend.standby_status()["started"] == 2
        await backend.shutdown()
        assert backend.standbys == []
    asyncio.run(scenario())


@pytest.mark.slow
def test_a_replica_given_a_standby_and_stopped_before_it_started_stops_the_standby(ray_cluster, caplog):
    """A generation can fail between allocation and start (a sibling's start failed): its replicas are stopped
    unstarted, and the standby one of them was given goes with it, cleanly, its slots free again."""
    backend = RayBackend(device="cpu", standby=1, slots=2)
    spec = WorkerSpec(model="builtin:tiny", device="cpu", extra_args=ENGINE_ARGS, env=ENV)

    async def scenario():
        standby, replica = await tp2_on_a_warm_standby(backend, spec)
        with caplog.at_level("WARNING", logger="foundry_sglang.elastic.backends"):
            await replica.stop()
        assert backend.held == 0 and not [r for r in caplog.records if r.levelname == "WARNING"]
        wait_until(lambda: exited(standby.pid), timeout=30, what="standby stopped")
        await backend.shutdown()
    asyncio.run(scenario())


def test_a_gpu_standby_sees_its_node_and_its_replica_gets_one_gpu_per_rank(ray_cluster):
    """Ray gives a plain engine actor CUDA_VISIBLE_DEVICES of its own GPUs only; a standby's actor sees every GPU
    of the node (it cannot know its layout when CUDA starts), and a TP=3 replica handed to it gets rank 0 on the
    standby's GPU and ranks 1-2 on the two GPUs reserved beside it, all of them GPUs its process sees."""
    from ray.util.placement_group import placement_group, remove_placement_group

    backend = RayBackend(device="cuda", slots=4)
    spec = WorkerSpec(model="builtin:tiny", tp=3, device="cuda")

    async def scenario():
        own = placement_group([{"GPU": 1}])
        plain_group = placement_group([{"GPU": 1}])
        await asyncio.gather(own.ready(), plain_group.ready())
        actor = backend.new_actor(own, 1, standby=True)
        plain = backend.new_actor(plain_group, 1)
        here, there = await asyncio.gather(actor.where.remote(), plain.where.remote())
        assert here["node_gpus"] == ["0", "1", "2", "3"] and len(here["gpu_ids"]) == 1
        assert there["node_gpus"] == there["gpu_ids"] and len(there["gpu_ids"]) == 1
        assert here["gpu_ids"] != there["gpu_ids"]
        backend.kill(plain)
        remove_placement_group(plain_group)

        standby = _RayStandby(1, "standby-test", own, actor, started=None)
        standby.info = dict(here, pid=None)
        beside = placement_group([{"GPU": 2, f"node:{here['node_ip']}": 0.001}])
        await beside.ready()
        replica = _RayReplica(backend, 0, spec, 3, [own, beside], standby=standby)
        ranks = await replica._rank_gpus(standby)
        assert ranks[0] == here["gpu_ids"][0] and len(set(ranks)) == 3 and set(ranks) <= set(here["node_gpus"])
        flags = rank_placement(spec, ranks, here["node_gpus"])
        assert flags == [] or flags == ["--gpu-ids", ",".join(str(here["node_gpus"].index(g)) for g in ranks)]
        backend.kill(actor)
        remove_placement_group(own)
        remove_placement_group(beside)
    asyncio.run(scenario())


def test_ray_standby_flags():
    assert RayBackend(standby=2).standby_target == 2
    with pytest.raises(ValueError, match="standby_coreside needs standby >= 1 and backend 'local'"):
        DeploymentConfig(model="builtin:tiny", backend="ray", standby=1, standby_coreside=True)
