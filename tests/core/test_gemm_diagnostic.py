"""The pure parts of the bf16 GEMM-toy diagnostic in tests/gpu/test_fidelity_gemm.py (run on CPU so the next GPU
run does not spend its minutes on a typo): archive-vs-rebuilt table comparison, row verdicts, the diagnosis text."""
from __future__ import annotations

import numpy as np
import pytest

from foundry_core import schema
from foundry_core.codec import DecodedGraph


@pytest.fixture(scope="module")
def cf():
    from gpu import test_fidelity_gemm

    return test_fidelity_gemm


def _tables():
    nodes = np.zeros(2, schema.NODE_DTYPE)
    nodes["kind"] = schema.NODE_KERNEL
    nodes["grid"] = [[8, 1, 1], [2, 1, 1]]
    nodes["block"] = [[128, 1, 1], [256, 1, 1]]
    nodes["payload_off"], nodes["payload_len"] = [0, 16], [16, 8]
    nodes["attr_off"], nodes["attr_cnt"] = [0, 1], [1, 1]
    payload = np.frombuffer(bytes(range(24)), np.uint8)
    attrs = np.zeros(2, schema.ATTR_DTYPE)
    attrs["id"] = [9, 4]
    attrs["value"][1][:4] = [2, 0, 0, 0]
    edges = np.zeros(1, schema.EDGE_DTYPE)
    edges[0]["src"], edges[0]["dst"], edges[0]["from_port"], edges[0]["type"] = 0, 1, 1, 1
    return nodes, payload, attrs, edges


def _read_back(nodes, payload, attrs, edges):
    return DecodedGraph(nodes.copy(), payload.tobytes(), attrs.copy(), edges.copy(), [], [])


def test_identical_rebuild_has_no_differences(cf):
    t = _tables()
    assert cf.table_differences(t, _read_back(*t)) == {}


def test_lost_attribute_edge_data_and_arguments_are_named(cf):
    t = _tables()
    nodes, payload, attrs, edges = (x.copy() for x in t)
    attrs["value"][1][0] = 1  # cluster dimension changed on node 1
    edges[0]["type"] = 0  # programmatic edge became a plain one
    payload = payload.copy()
    payload[3] ^= 0xFF  # one argument byte of node 0
    nodes["grid"][1] = [4, 1, 1]
    got = cf.table_differences(t, _read_back(nodes, payload, attrs, edges))
    assert got == {"grid": 1, "arguments": 1, "launch attributes": 1, "edges": 1}
    assert cf.table_differences(t, _read_back(nodes[:1], payload, attrs, edges)) == {"node/edge count": 1}


def _save(hashes, inproc=None, error=None):
    return {"hashes": hashes, "values": {k: [1.0] for k in hashes}, "inproc": inproc if inproc is not None else hashes,
            "inproc_error": error, "deterministic": True, "nodes": {"decode_bs8": 12}, "kernels": ["nvjet_x", "k"],
            "identity": {"k": [[32, 0]]}, "module_globals": {"recorded": [["c", "0x1", 112]], "oracle_sees": [],
                                                           "refs": 2.0, "changed": 0.0},
            "graph_pool_snapshots": 0.0}


def _load(hashes, identity=None):
    return {"hashes": hashes, "values": {k: [1.5] for k in hashes}, "rebuilt_vs_archive": {},
            "identity": identity or {"k": [[32, 0]]}}


GOOD = {"11/bs8": "a", "11/bs2": "b"}
BAD = {"11/bs8": "x", "11/bs2": "y"}


def test_rows_fail_on_wrong_results_and_name_the_evidence(cf):
    name, verdict, detail = cf._gemm_row("base", _save(GOOD), _load(BAD, {"k": [[40, 0]]}))
    assert verdict == "FAIL" and "LOAD 0/2 bitwise" in detail and "in-process rebuild 2/2" in detail
    assert "argument refs 2.0" in detail and "identity differs for ['k']" in detail
    assert cf._gemm_row("base", _save(GOOD), _load(GOOD))[1] == "PASS"
    assert cf._gemm_row("x", {"error": "UnsafeAddress: ..."}, None)[1] == "info"
    assert cf._gemm_row("x", {"error": "child gemm-save rc=1: Traceback", "crashed": True}, None)[1] == "FAIL"
    assert cf._gemm_row("x", _save(GOOD), {"error": "LayoutMismatch"})[1] == "FAIL"


def test_diagnosis_points_at_module_state_when_only_a_warm_cublas_helps(cf):
    res = {"base": (_save(GOOD), {"plain": _load(BAD), "cublas-warm": _load(GOOD)}),
           "graph-pool-snapshot": (_save(GOOD), {"plain": _load(BAD)}),
           "explicit-stream": (_save(GOOD), {"plain": _load(BAD)})}
    text = cf.gemm_diagnosis(res)
    assert "in-process rebuild" in text and "(b')" in text and "(a)" not in text


def test_diagnosis_points_at_the_rebuild_when_in_process_differs(cf):
    res = {"base": (_save(GOOD, inproc=BAD), {"plain": _load(BAD)})}
    text = cf.gemm_diagnosis(res)
    assert "differs too" in text and "(c)" in text and "(d)" in text


def test_diagnosis_points_at_capture_memory(cf):
    res = {"base": (_save(GOOD), {"plain": _load(BAD), "cublas-warm": _load(BAD)}),
           "graph-pool-snapshot": (_save(GOOD), {"plain": _load(GOOD)}),
           "explicit-stream": (_save(GOOD), {"plain": _load(GOOD)})}
    text = cf.gemm_diagnosis(res)
    assert "(a) state in memory the capture allocated" in text and "(b')" not in text
    assert "['explicit-stream', 'graph-pool-snapshot']" in text


def test_every_variant_names_a_known_toy(cf):
    assert set(cf.GEMM_VARIANTS) >= {"base", "explicit-stream", "graph-pool-snapshot"}
    for variant, _, env in cf.GEMM_VARIANTS.values():
        assert variant in ("gemm", "gemm-nn1", "gemm-tn1") and all(isinstance(v, str) for v in env.values())
    assert callable(cf.child_gemm_save) and callable(cf.child_gemm_load)
