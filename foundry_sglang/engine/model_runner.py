"""Runs the model on one rank: startup in a fixed order, eager prefill, decode through CUDA graphs.

Startup order (foundry_core relies on it: the same allocation sequence in SAVE and LOAD processes):
1. torch.distributed init (NCCL on GPU, gloo on CPU) plus a gloo control group;
2. ``before_allocations()`` hook (the Foundry backend arms its memory arena here);
3. weights; 4. KV cache; 5. static decode buffers;
6. graph capture through the graph backend, largest batch first, reading only the static buffers.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..proc import disable_nvls
from .attention import AttentionMetadata
from .batch import DECODE, PREFILL, StepBatch
from .config import ConfigError, EngineArgs, ModelConfig, load_model_config
from .graphs import GraphBackend, GraphBackendFactory, plain_graph_backend
from .model import Qwen3ForCausalLM, expected_names, random_weights, safetensors_weights
from .parallel import Collectives, ParallelState, set_state

log = logging.getLogger("foundry_sglang.engine")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_LONG_TIMEOUT = datetime.timedelta(days=30)  # idle workers block in broadcast between requests


def resolve_dtype(args: EngineArgs, cfg: ModelConfig, device: str) -> torch.dtype:
    if args.dtype != "auto":
        return _DTYPES[args.dtype]
    if device == "cpu":
        return torch.float32
    return _DTYPES.get(cfg.torch_dtype, torch.bfloat16) if cfg.torch_dtype != "float32" else torch.float32


def gpu_kv_pages(args: EngineArgs, rank: int, free: int, total: int, page_bytes: int) -> int:
    """KV pages for ``rank`` on a GPU with ``free`` of ``total`` bytes free: what the memory fraction leaves
    after activations and graphs (4 GiB a rank), split evenly among the layout's ranks on that GPU."""
    sharing = args.rank_gpus().count(args.gpu_of(rank))
    reserve = (1 - args.gpu_memory_fraction) * total + sharing * 4 * 2 ** 30
    return max(2, int((free - reserve) // sharing // page_bytes))


def init_distributed(args: EngineArgs, rank: int, device: str, virtual: bool = False) -> ParallelState:
    """Process group (NCCL on GPU, gloo on CPU) plus a gloo control group for step messages and barriers.
    ``virtual``: this process captures rank ``rank`` of the layout alone (comm_patch); no group is made."""
    disable_nvls()  # before any NCCL communicator exists in this process
    state = ParallelState(rank=rank, world_size=args.world_size, tp=args.tp, ep=args.ep, virtual=virtual)
    if args.world_size > 1 and not virtual:
        if device == "cuda" and args.ranks_share_gpu:
            # Several ranks on one GPU: NCCL refuses "duplicate GPU" unless each rank looks like its own host;
            # it then uses its socket transport over loopback.
            os.environ["NCCL_HOSTID"] = f"foundry-rank{rank}"
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                    init_method=f"tcp://127.0.0.1:{args.dist_port}",
                                    rank=rank, world_size=args.world_size, timeout=_LONG_TIMEOUT)
        state.control_group = dist.new_group(backend="gloo", timeout=_LONG_TIMEOUT)
    set_state(state)
    return state


class ModelRunner:
    """Owns the model, the KV cache, the static decode buffers and the decode graphs of one rank.

    ``graph_backend``: a :class:`~.graphs.GraphBackend`; None asks ``graph_backend_factory`` (default: live
    capture, :func:`~.graphs.plain_graph_backend`); pass ``False`` to force eager decode.
    ``virtual``: this process captures rank ``rank`` of the layout alone (no process group); its cross-rank
    operations go to ``collectives`` (a Foundry SAVE records them as slots).
    """

    def __init__(self, args: EngineArgs, rank: int = 0, graph_backend=None, virtual: bool = False,
                 gpu: Optional[int] = None, graph_backend_factory: Optional[GraphBackendFactory] = None,
                 collectives: Optional[Collectives] = None):
        self.args = args
        self.rank = rank
        self.startup_marks: Dict[str, float] = {"runner": time.time()}  # wall clock at the end of each phase
        self.device_type = args.resolved_device()
        self.cfg = load_model_config(args.model)
        if self.device_type == "cuda":
            index = args.gpu_of(rank) if gpu is None else gpu
            torch.cuda.set_device(index)  # creates the CUDA context (CUDA >= 12)
            self.device = torch.device("cuda", index)
        else:
            self.device = torch.device("cpu")
        self.startup_marks["cuda_init"] = time.time()
        self.dtype = resolve_dtype(args, self.cfg, self.device_type)
        self.max_model_len = min(args.max_model_len or self.cfg.max_position_embeddings,
                                 self.cfg.max_position_embeddings)
        self.page_size = args.page_size
        self.max_pages_per_seq = -(-self.max_model_len // self.page_size)
        self.max_bs = args.max_num_seqs

        # 1. distributed
        self.state = init_distributed(args, rank, self.device_type, virtual)
        if args.world_size > 1 and self.device_type == "cuda" and not virtual:
            dist.all_reduce(torch.zeros(1, device=self.device))  # create the NCCL communicator before capture
        if graph_backend is None:
            graph_backend = (graph_backend_factory or plain_graph_backend)(args, rank, self.barrier)
        self.graph_backend: Optional[GraphBackend] = graph_backend or None
        if self.graph_backend is not None:
            # Barriers are the runner's: every rank must reach the same ones, whoever built the backend.
            self.graph_backend.barrier = self.barrier
            self.graph_backend.all_ranks_ok = self.all_ranks_ok
            if not virtual:
                self.graph_backend.prepare_layout(args, rank)  # e.g. a Foundry rank template saved first
            # 2. hook
            self.graph_backend.before_allocations()
        if collectives is not None:
            self.state.collectives = collectives
        self.startup_marks["distributed_and_graph_backend"] = time.time()
        # 3. weights
        t0 = time.perf_counter()
        self.model = Qwen3ForCausalLM(self.cfg, self.dtype, self.device)
        self._load_weights()
        self.weights_seconds = time.perf_counter() - t0
        self.startup_marks["weights"] = time.time()
        # 4. KV cache
        self.num_kv_pages = self._resolve_num_kv_pages()
        if self.graph_backend is not None:  # a SAVE records it so that LOAD can force the same size
            self.graph_backend.save_extra["num_kv_pages"] = str(self.num_kv_pages)
        self._allocate_kv_cache()
        # 5. static decode buffers
        self._allocate_static_buffers()
        self.startup_marks["kv_cache"] = time.time()
        # 6. graphs
        self.graph_bs: List[int] = []
        self.capture_seconds = 0.0
        if self.graph_backend is not None:
            self.capture_graphs()
        self.startup_marks["graphs"] = time.time()

    # -- startup ----------------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.state.world_size > 1 and not self.state.virtual:
            dist.barrier(group=self.state.control_group)

    def all_ranks_ok(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank (gloo control group); ranks use it to take the same path."""
        if self.state.world_size == 1 or self.state.virtual:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.state.control_group)
        return bool(flag.item())

    def _load_weights(self) -> None:
        if self.args.model.startswith("builtin:"):
            source = random_weights(self.cfg, self.args.seed, self.device, self.dtype)
        else:
            source = safetensors_weights(self.args.model, self.device)
        missing = set(expected_names(self.cfg))
        for name, full in source:
            if self.model.load_weight(name, full):
                missing.discard(name)
        if self.cfg.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ConfigError(f"{self.args.model}: {len(missing)} weights missing, e.g. {sorted(missing)[0]}")

    def _page_bytes(self) -> int:
        attn = self.model.layers[0].self_attn
        el = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.cfg.num_hidden_layers * self.page_size * attn.n_kv * self.cfg.head_dim * el

    def _resolve_num_kv_pages(self) -> int:
        """Explicit --num-kv-pages, else enough for max_num_seqs full contexts, capped on GPU by the memory
        fraction, which the layout's ranks on this GPU split evenly (also a virtual rank captured alone, so that
        the archive's size fits the layout); the same number on every rank (minimum)."""
        wanted = self.max_bs * self.max_pages_per_seq + 1
        if self.args.num_kv_pages is not None:
            return self.args.num_kv_pages
        saved = self.graph_backend.saved_extra if self.graph_backend is not None else {}
        if "num_kv_pages" in saved:  # Foundry LOAD: the size the archive's graphs were captured with
            return int(saved["num_kv_pages"])
        if self.device_type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            pages = gpu_kv_pages(self.args, self.rank, free, total, self._page_bytes())
        else:
            pages = max(2, (64 * 2 ** 20) // self._page_bytes())  # CPU default: 64 MiB of KV
        pages = min(pages, wanted)
        if self.state.world_size > 1 and not self.state.virtual:
            t = torch.tensor([pages], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.state.control_group)
            pages = int(t.item())
        return pages

    def _allocate_kv_cache(self) -> None:
        attn0 = self.model.layers[0].self_attn
        slots = self.num_kv_pages * self.page_size
        self.kv_cache = torch.zeros(2, self.cfg.num_hidden_layers, slots, attn0.n_kv, self.cfg.head_dim,
                                    dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.v_cache = self.kv_cache[1, i]

    def _allocate_static_buffers(self) -> None:
        n, dev = self.max_bs, self.device
        self.s_input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.s_positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.s_slot_mapping = torch.zeros(n, dtype=torch.int64, device=dev)
        self.s_seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.s_block_tables = torch.zeros(n, self.max_pages_per_seq, dtype=torch.int32, device=dev)

    def capture_graphs(self) -> None:
        sizes = self.args.graph_batch_sizes()
        backend = self.graph_backend
        stream = torch.cuda.Stream(device=self.device)
        t0 = time.perf_counter()
        try:
            from tqdm import tqdm
            it = tqdm(sorted(sizes, reverse=True), desc="capture decode graphs", disable=self.rank != 0)
        except ImportError:
            it = sorted(sizes, reverse=True)
        with torch.inference_mode(), backend.capture_session(stream):
            for bs in it:
                backend.capture_one(bs, lambda bs=bs: self._decode_forward_static(bs))
        torch.cuda.synchronize(self.device)
        self.graph_bs = sorted(sizes)
        self.capture_seconds = time.perf_counter() - t0
        log.info("rank %d: %d decode graphs ready in %.2f s", self.rank, len(sizes), self.capture_seconds)

    # -- forward ----------------------------------------------------------------------------------
    def _decode_forward_static(self, bs: int, width: Optional[int] = None) -> torch.Tensor:
        """Decode forward reading only the static buffers; returns float32 logits [bs, vocab].

        ``width`` (eager only) limits the block-table columns, which the CPU reference attention gathers in full.
        """
        meta = AttentionMetadata(is_prefill=False, slot_mapping=self.s_slot_mapping[:bs],
                                 block_tables=self.s_block_tables[:bs, :width], seq_lens=self.s_seq_lens[:bs],
                                 page_size=self.page_size, use_triton=self.device_type == "cuda")
        hidden = self.model(self.s_input_ids[:bs], self.s_positions[:bs], meta)
        return self.model.compute_logits(hidden)

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def graph_size_for(self, bs: int) -> Optional[int]:
        """The smallest captured size >= bs, or None to run eagerly."""
        for s in self.graph_bs:
            if s >= bs:
                return s if self.graph_backend.can_run(s) else None
        return None

    @torch.inference_mode()
    def run(self, batch: StepBatch, use_graph: bool = True) -> torch.Tensor:
        """Execute one step; returns float32 logits [num_seqs, vocab] (identical on every rank)."""
        if batch.kind == PREFILL:
            cu = batch.cu_seqlens
            meta = AttentionMetadata(is_prefill=True, slot_mapping=self._tensor(batch.slot_mapping),
                                     cu_seqlens=cu, page_size=self.page_size)
            hidden = self.model(self._tensor(batch.input_ids), self._tensor(batch.positions), meta)
            last = self._tensor([e - 1 for e in cu[1:]])
            return self.model.compute_logits(hidden[last])
        assert batch.kind == DECODE
        bs = batch.num_seqs
        padded = self.graph_size_for(bs) if (use_graph and not batch.eager and self.graph_bs) else None
        n = padded or bs
        width = max(len(r) for r in batch.block_tables)
        self.s_input_ids[:bs].copy_(self._tensor(batch.input_ids))
        self.s_positions[:bs].copy_(self._tensor(batch.positions))
        self.s_slot_mapping[:bs].copy_(self._tensor(batch.slot_mapping))
        self.s_seq_lens[:bs].copy_(self._tensor(batch.seq_lens, torch.int32))
        rows = [r + [0] * (width - len(r)) for r in batch.block_tables]
        self.s_block_tables[:bs, :width].copy_(self._tensor(rows, torch.int32))
        if n > bs:  # padding rows: token 0 at position 0, writing into the reserved page 0
            self.s_input_ids[bs:n].zero_()
            self.s_positions[bs:n].zero_()
            self.s_slot_mapping[bs:n].zero_()
            self.s_seq_lens[bs:n].fill_(1)
            self.s_block_tables[bs:n].zero_()
        if padded:
            return self.graph_backend.replay(padded)[:bs]
        return self._decode_forward_static(bs, width)

    def shutdown(self) -> None:
        if self.graph_backend is not None:
            self.graph_backend.cleanup()
        if dist.is_initialized():
            dist.destroy_process_group()
