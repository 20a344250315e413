"""GPU probe (one GPU, seconds): why does a rebuilt bf16 NN GEMM graph (cuBLASLt split-K + PDL edge) compute
different numbers than the captured one, in the same process?

    PYTHONPATH=$PWD:$PYTHONPATH python3 tools/probe_pdl_gemm.py

Captures ``(x @ w).float()`` (x [8, 4096] bf16, w [4096, 2048], the NN GEMM of the GEMM toy in
tests/gpu/test_fidelity_gemm.py) into a CUDA graph, reads it with ``codec.GraphReader`` and rebuilds it with the
native builder using the ORIGINAL function handles (no fresh modules), in variants: as read; PDL edges made plain;
launch attributes dropped; and the driver's own ``cuGraphClone`` as a control. Each variant: outputs vs the
captured graph on fresh inputs (poisoned first), and the edges read back from the rebuilt graph. Prints one row
per variant.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo

import numpy as np
import torch

from foundry_core.codec import GraphReader
from foundry_core.native import native_lib
from foundry_core.restore import NativeTables


def edges_of(dg) -> list[tuple[int, ...]]:
    return [tuple(int(e[k]) for k in ("src", "dst", "from_port", "to_port", "type")) for e in dg.edges]


def main() -> int:
    from tools.needs_gpu import exit_without_gpu

    exit_without_gpu("this probe")
    from cuda.bindings import driver as drv

    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(4096, 2048, generator=g) / 64).to("cuda", torch.bfloat16)
    x = torch.zeros(8, 4096, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            (x @ w).float()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(graph, stream=stream):
        out = (x @ w).float()
    graph.instantiate()
    raw = graph.raw_cuda_graph()
    reader = GraphReader()
    dg = reader.read(raw)
    names = [reader.function_name(f)[:60] for f in dg.functions]
    print("captured nodes:", [(int(n["kind"]), int(n["ref"]), n["grid"].tolist(), int(n["payload_len"]),
                               int(n["attr_cnt"])) for n in dg.nodes])
    print("functions:", names)
    print("captured edges (src, dst, from_port, to_port, type):", edges_of(dg))
    print("attrs:", [(int(a["id"]), a["value"][:16].tolist()) for a in dg.attrs])
    _, nodes_raw, _ = drv.cuGraphGetNodes(drv.CUgraph(int(raw)), len(dg.nodes))
    for i, node in enumerate(nodes_raw):  # every launch attribute id the driver answers for, non-zero values
        have = {}
        for aid in range(1, 20):
            try:
                e, value = drv.cuGraphKernelNodeGetAttribute(node, drv.CUkernelNodeAttrID(aid))
            except ValueError:  # not an attribute id of this CUDA version
                continue
            if int(e) == 0:
                raw_bytes = ctypes.string_at(int(value.getPtr()), 64)
                if any(raw_bytes):
                    have[aid] = raw_bytes[:16].hex()
            elif aid in (6, 7, 12):
                have[aid] = f"err {int(e)}"
        print(f"node (driver order) {i}: attributes {have}")

    lib = native_lib()
    err = ctypes.create_string_buffer(512)
    s = torch.cuda.current_stream().cuda_stream

    def reference(seed: int) -> torch.Tensor:
        x.copy_(torch.randn(8, 4096, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        return out.clone()

    def run_exec(exec_: int, seed: int) -> torch.Tensor:
        x.copy_(torch.randn(8, 4096, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16))
        out.fill_(float("nan"))
        rc = lib.foundry_launch(exec_, s)
        torch.cuda.synchronize()
        assert rc == 0, rc
        return out.clone()

    def build(nodes, attrs, edges) -> int:
        tables = NativeTables(nodes, np.frombuffer(dg.payload, np.uint8).copy(), attrs, edges,
                              np.asarray(dg.functions, np.uint64), np.asarray(dg.events, np.uint64),
                              np.zeros(0, np.uint64))
        gr = ctypes.c_void_p()
        if lib.foundry_build_graph(*tables.pointers(), ctypes.byref(gr), err, len(err), None, 0,
                                   ctypes.byref(tables.sizes)) != 0:
            raise RuntimeError(err.value.decode())
        return gr.value

    plain = dg.edges.copy()
    plain["from_port"] = 0
    plain["to_port"] = 0
    plain["type"] = 0
    variants = {
        "as read": (dg.nodes, dg.attrs, dg.edges),
        "PDL edges -> plain": (dg.nodes, dg.attrs, plain),
    }
    rows = []
    for name, (nodes, attrs, edges) in list(variants.items()) + [("cuGraphClone (control)", (None, None, None))]:
        try:
            if nodes is None:
                _, clone = drv.cuGraphClone(drv.CUgraph(int(raw)))
                gr = int(clone)
            else:
                gr = build(nodes, attrs, edges)
            back = edges_of(reader.read(gr))
            ex = ctypes.c_void_p()
            if lib.foundry_instantiate(ctypes.c_void_p(gr), s, ctypes.byref(ex), err, len(err)) != 0:
                raise RuntimeError(err.value.decode())
            equal = 0
            for seed in (1, 2, 3):
                equal += bool(torch.equal(reference(seed), run_exec(ex.value, seed)))
            rows.append((name, f"{equal}/3 bitwise", f"edges read back {back} (== captured: {back == edges_of(dg)})"))
        except Exception as e:  # a probe: report and go on
            rows.append((name, "error", f"{type(e).__name__}: {e}"[:300]))
        print(" | ".join(rows[-1]), flush=True)
    ref_again = sum(bool(torch.equal(reference(k), reference(k))) for k in (1, 2, 3))
    print(f"\ncaptured graph replay-to-replay deterministic: {ref_again}/3")
    return 0


if __name__ == "__main__":
    sys.exit(main())
