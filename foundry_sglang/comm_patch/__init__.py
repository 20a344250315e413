"""Rank patching: one single-GPU capture serves every rank of a tensor/expert-parallel layout.

How a TP/EP graph becomes restorable (built-in engine):

1. **SAVE on one GPU** (``template.save_template``): each virtual rank is captured in its own process on one GPU,
   with every collective turned into a ``foundry_core`` slot placeholder (``collectives.PlaceholderCollectives``)
   that records ``{slot, group, op, dtype, count, send, recv, order}``.
2. **Differential capture** (``foundry_core.ranks``): rank 0 is captured twice (the differences are noise:
   uninitialised argument padding) and every other rank once; ranks must be structurally identical, and what
   still differs is stored as a small per-rank byte delta. Rank-dependent values that used to be kernel
   arguments (vocabulary window, first local expert) are device tensors, so the deltas are normally empty.
3. **LOAD on rank r of N** (``nccl.make_slot_filler``): the real communicator is up; rank 0's graphs are rebuilt,
   rank r's delta applied, and each slot is filled by capturing the real collective into the restored graph in
   the same order on every rank. A graph with an unfilled slot is never instantiated.

SGLang's own TP graphs are not wired to this yet: ``sglang_state`` lists the rank-dependent state they hold
(custom all-reduce IPC buffers, symmetric memory, NVLS, mscclpp) and the plugin refuses such layouts with a
one-line message naming the flag to use.
"""
from foundry_sglang.comm_patch.collectives import PlaceholderCollectives
from foundry_sglang.comm_patch.sglang_state import (
                                                    COMM_FLAGS,
                                                    UnsupportedParallelRestore,
                                                    check_parallel_restore,
                                                    rank_dependent_state,
)

__all__ = ["PlaceholderCollectives", "COMM_FLAGS", "UnsupportedParallelRestore", "check_parallel_restore",
           "rank_dependent_state"]
