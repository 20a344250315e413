"""Routed MoE of the built-in engine: expert grouping, the torch and Triton grouped paths against the
all-experts reference, expert-parallel splitting, and the model layer."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from foundry_sglang.engine.config import builtin_config
from foundry_sglang.engine.model import Qwen3MoE, random_weights
from foundry_sglang.engine.moe import (
    all_experts_moe,
    group_by_expert,
    grouped_moe_torch,
    max_grouped_rows,
    pick_block_m,
    select_experts,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _experts(e, h, inter, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * inter, h, generator=g) * h ** -0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=g) * inter ** -0.5).to(dtype)
    gate = torch.randn(e, h, generator=g) * h ** -0.5
    return gate, w13, w2


@pytest.mark.parametrize("n,k,e,block_m", [(1, 8, 128, 16), (7, 2, 8, 16), (64, 4, 16, 32), (300, 2, 4, 64)])
def test_grouping_places_every_assignment_once_in_its_experts_blocks(n, k, e, block_m):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, e + 1, (n, k), generator=g)  # e = the drop bucket (another rank's expert)
    groups = group_by_expert(ids, e, block_m)
    rows, experts = groups.rows.long(), groups.block_expert.long()
    flat = ids.reshape(-1)
    assert rows.numel() == max_grouped_rows(n * k, e, block_m) and rows.numel() % block_m == 0
    used = int(groups.rows_used)
    assert used % block_m == 0 and (rows[used:] == n * k).all()
    real = rows[rows < n * k]
    kept = (flat < e).nonzero().squeeze(1)
    assert sorted(real.tolist()) == kept.tolist()  # each local assignment exactly once, dropped ones absent
    row_expert = experts.repeat_interleave(block_m)
    placed = rows < n * k
    assert (flat[rows[placed]] == row_expert[placed]).all()  # a row sits in a block of its own expert
    for x in range(e):  # experts in order, each padded to whole blocks, stable inside
        mine = rows[placed & (row_expert == x)]
        assert mine.tolist() == sorted(mine.tolist())
        count = int((flat == x).sum())
        assert int((row_expert[:used] == x).sum()) == -(-count // block_m) * block_m


def test_grouping_bound_holds_for_extreme_routings():
    for ids in (torch.zeros(50, 4, dtype=torch.long), torch.arange(200).reshape(50, 4) % 128):
        groups = group_by_expert(ids, 128, 16)
        assert int(groups.rows_used) <= groups.rows.numel()
        assert int((groups.rows < ids.numel()).sum()) == ids.numel()


@pytest.mark.parametrize("n", [1, 5, 64, 257])
@pytest.mark.parametrize("renormalize", [True, False])
def test_routed_torch_path_equals_all_experts_reference(n, renormalize):
    gate, w13, w2 = _experts(16, 64, 48, seed=n)
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(1))
    r = select_experts(x, gate, 4, renormalize, 0, 16)
    torch.testing.assert_close(grouped_moe_torch(x, w13, w2, r), all_experts_moe(x, w13, w2, r),
                               rtol=1e-5, atol=1e-5)


def test_routed_path_never_touches_unrouted_experts():
    gate, w13, w2 = _experts(8, 32, 16)
    x = torch.randn(3, 32)
    r = select_experts(x, gate, 2, True, 0, 8)
    unused = sorted(set(range(8)) - set(r.ids.reshape(-1).tolist()))
    assert unused
    w13[unused] = float("nan")
    assert torch.isfinite(grouped_moe_torch(x, w13, w2, r)).all()
    assert not torch.isfinite(all_experts_moe(x, w13, w2, r)).all()  # the reference multiplies NaN by 0


def test_expert_parallel_ranks_sum_to_the_full_layer():
    e, ep = 16, 4
    gate, w13, w2 = _experts(e, 64, 32, seed=5)
    x = torch.randn(33, 64)
    full = grouped_moe_torch(x, w13, w2, select_experts(x, gate, 4, True, 0, e))
    local = e // ep
    parts = [grouped_moe_torch(x, w13[i * local:(i + 1) * local], w2[i * local:(i + 1) * local],
                               select_experts(x, gate, 4, True, torch.tensor([i * local]), local))
             for i in range(ep)]  # the first expert as device data, as the model passes it
    torch.testing.assert_close(sum(parts), full, rtol=1e-5, atol=1e-5)


def test_block_size_grows_with_rows_per_expert():
    assert pick_block_m(8, 128) == 16 and pick_block_m(2048, 128) == 16
    assert pick_block_m(8192, 128) == 32 and pick_block_m(65536, 128) == 64


def test_model_layer_uses_routed_path_and_matches_reference():
    cfg = builtin_config("builtin:tiny-moe")
    moe = Qwen3MoE(cfg, torch.float32, "cpu")
    for name, full in random_weights(cfg, 3, "cpu", torch.float32):
        if name == "model.layers.0.mlp.gate.weight":
            moe.gate.data.copy_(full)
        elif name.startswith("model.layers.0.mlp.experts."):
            parts = name.split(".")
            moe.load_expert(int(parts[5]), parts[6], full)
    x = torch.randn(6, cfg.hidden_size)
    ref = all_experts_moe(x, moe.w13, moe.w2, moe.routing(x))
    torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-5)


_TRITON_CHECK = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from foundry_sglang.engine.moe import all_experts_moe, grouped_moe_triton, select_experts
g = torch.Generator().manual_seed(0)
for n, k, e, h, inter, first, local in [(3, 2, 8, 32, 16, 0, 8), (20, 4, 8, 48, 40, 4, 4), (1, 2, 4, 64, 64, 0, 4)]:
    w13 = torch.randn(local, 2 * inter, h, generator=g) * h ** -0.5
    w2 = torch.randn(local, h, inter, generator=g) * inter ** -0.5
    gate = torch.randn(e, h, generator=g)
    x = torch.randn(n, h, generator=g)
    r = select_experts(x, gate, k, True, first, local)
    torch.testing.assert_close(grouped_moe_triton(x, w13, w2, r), all_experts_moe(x, w13, w2, r),
                               rtol=1e-4, atol=1e-4)
from foundry_sglang.engine.moe import group_by_expert
from foundry_sglang.engine.triton_moe import fused_group, fused_route
for n, k, e, bm in [(1, 8, 128, 16), (7, 2, 8, 16), (64, 4, 16, 32), (300, 2, 4, 64), (33, 8, 128, 16)]:
    ids = torch.randint(0, e + 1, (n, k), generator=g)
    a, b = group_by_expert(ids, e, bm), fused_group(ids, e, bm)
    assert torch.equal(a.rows, b.rows) and torch.equal(a.block_expert, b.block_expert), (n, k, e)
    assert torch.equal(a.rows_used, b.rows_used)
for n, k, e, first, local, renorm in [(5, 2, 8, 0, 8, True), (9, 8, 128, 32, 32, True), (3, 4, 60, 0, 60, False)]:
    x, gate = torch.randn(n, 32, generator=g), torch.randn(e, 32, generator=g)
    r = select_experts(x, gate, k, renorm, first, local)
    w, i = fused_route(torch.nn.functional.linear(x, gate), k, renorm, torch.tensor([first]), local)
    assert torch.equal(i, r.ids), (i, r.ids)
    torch.testing.assert_close(w, r.weights)
print("TRITON_MOE_OK")
"""


def test_triton_routing_grouping_and_grouped_gemm_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _TRITON_CHECK, ROOT], env=env, capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert "TRITON_MOE_OK" in r.stdout, r.stderr[-3000:]
