"""Where a replica's ranks run: GPUs shared by slots (one GPU for several ranks and replicas) and the flags that
place the ranks of each engine kind (no GPU needed: commands and slot bookkeeping only)."""
import asyncio

import pytest

from foundry_sglang.elastic.backends import LocalBackend, ray_gpu_ids
from foundry_sglang.elastic.deployment import DeploymentConfig, ElasticServer
from foundry_sglang.elastic.layout import Layout
from foundry_sglang.elastic.workers import ProcessWorker, WorkerSpec, build_env, rank_placement


def spec(kind, **kw):
    return WorkerSpec(**dict(dict(model="m", kind=kind, device="cuda"), **kw))


@pytest.mark.parametrize("kind, ranks, visible, flags", [
    ("builtin", [0, 1], [0, 1], []),                                  # rank r on visible GPU r: nothing to say
    ("builtin", [1], [0, 1], ["--gpu-ids", "1"]),
    ("builtin", [0, 0], [0], ["--gpu-ids", "0,0"]),                   # two ranks on one GPU
    ("sglang", [0, 0], [0], ["--base-gpu-id", "0", "--foundry-ranks-share-gpu"]),
    ("sglang", [3, 3], [2, 3], ["--base-gpu-id", "1", "--foundry-ranks-share-gpu"]),
    ("sglang", [1], [0, 1], ["--base-gpu-id", "1"]),
    ("sglang", [2, 0], [0, 1, 2, 3], ["--base-gpu-id", "0", "--gpu-id-step", "2"]),
])
def test_rank_placement_flags(kind, ranks, visible, flags):
    assert rank_placement(spec(kind), ranks, visible) == flags


def test_rank_placement_keeps_the_users_flags_and_refuses_what_sglang_cannot_express():
    assert rank_placement(spec("builtin", extra_args=["--gpu-ids=3"]), [1], [0, 1]) == []
    assert rank_placement(spec("sglang", extra_args=["--base-gpu-id", "1"]), [1], [0, 1]) == []
    assert rank_placement(WorkerSpec(model="m", kind="sglang", device="cpu"), [1], [0, 1]) == []
    with pytest.raises(ValueError, match="one GPU or evenly spaced"):
        rank_placement(spec("sglang"), [0, 1, 3], [0, 1, 2, 3])


def test_gpus_named_by_uuid_reach_the_server_as_named():
    # Ray hands an actor the node's CUDA_VISIBLE_DEVICES entries; on nodes that name GPUs by UUID they are not ints
    uuids = ["GPU-5f1c7a2e-0d1b-4c7e-9a51-2f0e8c1d7b3a", "GPU-9e2d4b60-71aa-4f0c-8d3e-6b5a1c2f9e07"]
    ids = ray_gpu_ids(uuids)
    assert ids == uuids and ray_gpu_ids([0, 1]) == ["0", "1"]
    assert rank_placement(spec("sglang"), [ids[0], ids[0]], ids[:1]) == ["--base-gpu-id", "0",
                                                                         "--foundry-ranks-share-gpu"]
    assert build_env(spec("sglang"), ids)["CUDA_VISIBLE_DEVICES"] == ",".join(uuids)


def test_slots_sharing_one_gpu_are_allocated_freed_and_allocated_again():
    backend = LocalBackend([0, 0])          # two slots on GPU 0
    assert backend.capacity()[0] == 2 and backend.visible == [0]

    async def scenario():
        for layout in (Layout(2, 1, 1), Layout(1, 1, 2), Layout(2, 1, 1)):
            replicas = await backend.allocate(1, layout, lambda i: spec("sglang", tp=layout.tp))
            assert sorted(s for r in replicas for s in r.slots) == [0, 1]
            assert [backend.gpus_of(r.slots) for r in replicas] == [[0] * layout.tp] * layout.replicas
            for r in replicas:
                await r.stop()
            assert backend.free == [0, 1]
    asyncio.run(scenario())


def test_a_shared_gpu_puts_every_rank_on_it(tmp_path):
    w = ProcessWorker()
    s = spec("builtin", tp=2, model="builtin:tiny", log_path=str(tmp_path / "w.log"))
    w.start(s, gpu_ids=[0, 0])                # the process fails here (no GPU); its command line is the point
    try:
        cmd = list(w.proc.args)
        assert cmd[cmd.index("--gpu-ids") + 1] == "0,0" and w.spec.extra_args == ["--gpu-ids", "0,0"]
    finally:
        w.stop(grace=2)


def test_slots_per_gpu_maps_slots_onto_fewer_gpus():
    server = ElasticServer(DeploymentConfig(model="builtin:tiny", slots=4, slots_per_gpu=2, backend="local"))
    assert server.controller.backend.gpus == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="slots_per_gpu"):
        DeploymentConfig(slots_per_gpu=0)
