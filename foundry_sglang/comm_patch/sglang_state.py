"""SGLang: rank-dependent state inside its tensor/expert-parallel CUDA graphs, and why the plugin refuses them.

A decode graph captured on one rank of a TP/EP group does not only read weights, KV cache and static buffers
(which the deterministic arena puts at the same addresses in SAVE and LOAD). In SGLang 0.5.23 it also holds:

1. **Custom all-reduce peer state** (``srt/distributed/device_communicators/custom_all_reduce.py``). The
   kernels take the addresses of the IPC-mapped *signal* buffers and of the peers' registered *graph buffers*
   by value; after capture SGLang exchanges the graph buffers' IPC handles (``register_graph_buffers``) so each
   rank maps its peers' buffers. Those mappings are made with ``cudaIpcOpenMemHandle`` outside any allocator
   we control: a fresh process gets different virtual addresses, so the baked-in arguments would be stale.
2. **NCCL communicators** (pynccl / torch ProcessGroupNCCL). Captured NCCL kernels take pointers to the
   communicator's device-side structures and channel buffers, allocated by NCCL during ``ncclCommInitRank``
   (before the arena is armed, by design: the graphs must not depend on communicator memory we cannot
   recreate). A new communicator lives at new addresses.
3. **Symmetric memory / NVLS** (``--enable-symm-mem``, ``--enable-nccl-nvls``, ``--enable-torch-symm-mem``,
   ``--enable-mscclpp``): multicast objects and symmetric windows, again allocated and mapped by the library.
4. **Rank-local constants**: rank index, expert placement (EP), DP-attention gather sizes; these are per-rank
   values baked into kernel arguments, which is why archives are keyed per rank (``foundry_sglang.keys``).

Items 1-3 are device pointers into memory that LOAD cannot restore at the same address today, so restoring a
TP>1 or EP>1 graph would launch kernels on stale pointers. Until a patch can re-point those arguments at LOAD
(rewrite the kernel-node parameters that hold the new process's communicator/IPC addresses, which needs the
pointer positions recorded at SAVE), :func:`check_parallel_restore` refuses such layouts with a clear message.
Single-GPU ranks (TP=EP=PP=1, no DP attention) contain none of this state and are allowed.
"""
from __future__ import annotations

from typing import Any, Optional

from foundry_core.errors import FoundryError


class UnsupportedParallelRestore(FoundryError):
    """The rank layout puts communicator state into the graphs that LOAD cannot re-create."""


#: Flags whose presence puts library-mapped memory into the graphs (any TP size).
COMM_FLAGS = {
    "enable_symm_mem": "--enable-symm-mem",
    "enable_nccl_nvls": "--enable-nccl-nvls",
    "enable_torch_symm_mem": "--enable-torch-symm-mem",
    "enable_mscclpp": "--enable-mscclpp",
}


def rank_dependent_state(tp_size: int, ep_size: int = 1, pp_size: int = 1, dp_attention: bool = False,
                         custom_all_reduce: bool = True) -> list[str]:
    """Names of the rank-dependent state a decode graph of this layout contains (empty: none)."""
    state = []
    if tp_size > 1 and custom_all_reduce:
        state.append("custom all-reduce IPC signal/graph-buffer addresses")
    if tp_size > 1 or ep_size > 1 or dp_attention:
        state.append("NCCL communicator device state")
    if pp_size > 1:
        state.append("pipeline send/recv communicator state")
    return state


def check_parallel_restore(server_args: Any) -> Optional[str]:
    """None when graphs of this configuration are rank-independent, else a one-line refusal naming the flag."""
    get = (server_args.get if isinstance(server_args, dict) else lambda k, d=None: getattr(server_args, k, d))
    for field, flag in COMM_FLAGS.items():
        if get(field, False):
            return (f"{flag} maps symmetric/multicast memory into the graphs that a restore cannot re-create; "
                    f"remove {flag} or run with --foundry-mode off")
    tp, ep, pp = int(get("tp_size", 1) or 1), int(get("ep_size", 1) or 1), int(get("pp_size", 1) or 1)
    dp_attention = bool(get("enable_dp_attention", False))
    state = rank_dependent_state(tp, ep, pp, dp_attention, custom_all_reduce=not get("disable_custom_all_reduce"))
    if not state:
        return None
    flag = "--tp-size" if tp > 1 else "--ep-size" if ep > 1 else "--pp-size" if pp > 1 else "--enable-dp-attention"
    hint = "; --disable-custom-all-reduce removes the IPC part" if "custom all-reduce" in state[0] else ""
    return (f"{flag} {max(tp, ep, pp) if flag != '--enable-dp-attention' else ''}".rstrip()
            + f": SGLang graphs would contain {' and '.join(state)}, which Foundry does not restore for SGLang yet "
            f"(rank templates exist for the built-in engine: foundry_sglang.comm_patch){hint}; use a single-GPU "
            "layout or --foundry-mode off")
