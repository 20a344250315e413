"""One rank of a 2-rank SGLang process group on CPU (gloo), with the plugin's collective hooks applied: what the
tests in test_plugin_parallel.py check, run as ``python sglang_rank.py RANK PORT WORKDIR`` (prints one JSON line).

Real SGLang classes throughout: ``init_distributed_environment`` and a ``GroupCoordinator`` named "tp", as SGLang
builds them, and its ``HookRegistry``. The only stand-in is the SAVE session, which records what
``Session.slot`` would be told (no kernel is launched on CPU).
"""
import json
import os
import sys

import torch
from plugin_standins import CpuStandInSession, SlotLog

from foundry_sglang.comm_patch import UnsupportedCollective
from foundry_sglang.graphs import GraphRouter
from foundry_sglang.plugin import collectives, hooks


def main(rank: int, port: int, workdir: str) -> dict:
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    ps.init_distributed_environment(world_size=2, rank=rank, local_rank=rank, backend="gloo",
                                    distributed_init_method=f"tcp://127.0.0.1:{port}")
    tp = ps.GroupCoordinator(group_ranks=[[0, 1]], local_rank=rank, torch_distributed_backend="gloo",
                             use_pynccl=False, use_mscclpp=False, use_custom_allreduce=False,
                             use_torch_symm_mem_all_reduce=False, use_hpu_communicator=False,
                             use_xpu_communicator=False, group_name="tp")
    for target, kind, fn, _why in collectives.COLLECTIVE_HOOKS:
        HookRegistry.register(target, fn, HookType[kind])
    HookRegistry.apply_hooks()
    out = {"unique_name": tp.unique_name, "world_rank": collectives.world_rank()}

    # Outside a SAVE capture the hooks are SGLang's own collectives (on CPU SGLang has only its all-reduce).
    out["live_all_reduce"] = tp.all_reduce(torch.full((4,), rank + 1.0)).tolist()

    # Inside: slots, in call order, with their buffers; nothing is communicated.
    log = SlotLog()
    x = torch.full((4, 8), rank + 1.0, dtype=torch.bfloat16)
    h = torch.randn(3, 5)
    gather_out = torch.empty(6, 5)
    rs_in, rs_out = torch.randn(8), torch.empty(4)
    with collectives.recording(log):
        same = tp.all_reduce(x)
        tp.all_gather_into_tensor(gather_out, h)
        tp.reduce_scatter_tensor(rs_out, rs_in)
        refused = []
        for name, call in (("broadcast", lambda: tp.broadcast(x)),
                           ("all_to_all_single", lambda: tp.all_to_all_single(torch.empty(4), torch.empty(4))),
                           ("all_gather list", lambda: tp.all_gather(h, 0, [torch.empty(3, 5), torch.empty(3, 5)]))):
            try:
                call()
            except UnsupportedCollective as err:
                refused.append([name, str(err)])
    out["in_place_returned_input"] = same is x
    out["x_untouched"] = bool((x == rank + 1.0).all())
    out["slots"] = [{k: v for k, v in c.items() if k not in ("send", "recv")} for c in log.calls]
    out["buffers"] = [[c["send"], c["recv"]] for c in log.calls]
    out["expected_buffers"] = [[x.data_ptr(), x.data_ptr()], [h.data_ptr(), gather_out.data_ptr()],
                               [rs_in.data_ptr(), rs_out.data_ptr()]]
    out["refused"] = refused

    agree = collectives.agreement()
    out["agree"] = [agree(True), agree(rank == 0)]
    out["kv_pool"] = kv_pool_route(rank, agree, workdir)
    collectives.barrier()
    return out


def kv_pool_route(rank: int, agree, workdir: str) -> dict:
    """LOAD's KV-pool step on both ranks of one archive, where only rank 1's GPU lacks the memory SAVE's pool and
    graphs took (30 GiB): the route each rank takes, agreed over the real gloo group."""
    from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig

    gib = 1 << 30
    path = os.path.join(workdir, f"kv-rank{rank}.foundry")
    with open(path, "w") as f:
        json.dump({"key": "k", "extra": {hooks.EXTRA_KV: json.dumps({"max_total_num_tokens": 4096}),
                                         hooks.EXTRA_KV_NEEDS: str(30 * gib)}}, f)
    session = CpuStandInSession(path, "load", key="k")
    router = GraphRouter(session, "load")
    router.agree = agree
    router.open()
    hooks._state = hooks.PluginState(session=session, router=router, capture=None, archive_path=path,
                                     key_material="{}", saved_kv_config={"max_total_num_tokens": 4096},
                                     saved_kv_needs_bytes=30 * gib)
    hooks._free_gpu_bytes = lambda: (40 if rank == 0 else 10) * gib

    class Configurator:
        is_draft_worker = False

    config = hooks.around_resolve_memory_pool_config(
        lambda self, m: MemoryPoolConfig(max_total_num_tokens=1024), Configurator(), 80)
    return {"route": str(router.route), "forced": hooks._state.kv_forced, "tokens": config.max_total_num_tokens,
            "problem": router.problem}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])), flush=True)
