"""The native bounds check (``foundry_check_graph`` in ``_native/restore.c``) under AddressSanitizer and UBSan.

    python3 tools/asan_native_check.py [--cases 50000]

Builds ``driver.c`` + ``restore.c`` with ``-fsanitize=address,undefined`` into a temporary directory, re-runs
itself with the sanitizer runtime preloaded, and feeds the check random node, payload, attribute and edge tables,
each in its own heap block of exactly its size, so a read one byte past any table stops the run with a report.
Needs cc with libasan/libubsan and cuda.h; no GPU. Exit status 0 only when every case ran clean.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from foundry_core import native, schema
from foundry_core.restore import TableSizes


def build(directory: Path) -> Path:
    out = directory / "librestore_asan.so"
    incs = [f"-I{d}" for d in native.cuda_include_dirs()]
    src = native.SOURCE_DIR
    subprocess.run(["cc", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer", "-shared", "-fPIC", "-std=gnu11", f"-I{src}", *incs,
                    str(src / "driver.c"), str(src / "restore.c"), "-o", str(out), "-ldl", "-lpthread"], check=True)
    return out


def check(library: str, cases: int, seed: int) -> None:
    lib = ctypes.CDLL(library)
    p = ctypes.c_void_p
    lib.foundry_check_graph.argtypes = [p, ctypes.c_uint32, p, p, p, ctypes.c_uint32, p, p, p, p, ctypes.c_char_p,
                                        ctypes.c_size_t]
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = p, [ctypes.c_size_t], [p]

    def block(data: bytes):
        if not data:
            return None
        ptr = libc.malloc(len(data))
        ctypes.memmove(ptr, data, len(data))
        return ptr

    rng = np.random.default_rng(seed)
    err = ctypes.create_string_buffer(256)
    refused = 0
    t0 = time.perf_counter()
    for _ in range(cases):
        n_nodes, n_edges = int(rng.integers(0, 8)), int(rng.integers(0, 8))
        nodes = np.frombuffer(rng.bytes(64 * n_nodes), schema.NODE_DTYPE).copy()
        if n_nodes and rng.random() < 0.8:  # near the table sizes, where an off-by-one would show
            nodes["kind"] %= 9
            nodes["ref"] %= 4
            nodes["payload_off"] %= 512
            nodes["payload_len"] %= 256
            nodes["attr_off"] %= 4
            nodes["attr_cnt"] %= 4
            memcpy = nodes["kind"] == schema.NODE_MEMCPY
            nodes["payload_len"][memcpy] = 200
            nodes["payload_off"][memcpy] &= np.uint64(~7 & (2**64 - 1))
        edges = np.frombuffer(rng.bytes(16 * n_edges), schema.EDGE_DTYPE).copy()
        if n_edges and rng.random() < 0.7:
            edges["src"] %= 9
            edges["dst"] %= 9
        payload = rng.bytes(int(rng.integers(0, 600)))
        n_attrs, n_funcs, n_events, n_children = (int(rng.integers(0, 4)) for _ in range(4))
        blocks = [block(nodes.tobytes()), block(payload), block(bytes(72 * n_attrs)), block(edges.tobytes()),
                  block(bytes(8 * n_funcs)), block(bytes(8 * n_events)), block(bytes(8 * n_children))]
        sizes = TableSizes(len(payload), n_attrs, n_funcs, n_events, n_children)
        rc = lib.foundry_check_graph(blocks[0], n_nodes, blocks[1], blocks[2], blocks[3], n_edges, *blocks[4:],
                                     ctypes.byref(sizes), err, len(err))
        refused += rc != 0
        for ptr in blocks:
            if ptr:
                libc.free(ptr)
    print(f"asan_native_check: {cases} random table sets, {refused} refused, {cases - refused} accepted, "
          f"no invalid memory access ({time.perf_counter() - t0:.0f} s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=50000, help="random table sets (default 50000)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--library", help=argparse.SUPPRESS)  # set when re-run under the sanitizer runtime
    a = ap.parse_args()
    if a.library:
        check(a.library, a.cases, a.seed)
        return 0
    with tempfile.TemporaryDirectory(prefix="foundry-asan-") as tmp:
        library = build(Path(tmp))
        runtime = [subprocess.run(["cc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
                   for name in ("libasan.so", "libubsan.so")]
        env = dict(os.environ, LD_PRELOAD=":".join(runtime), ASAN_OPTIONS="detect_leaks=0")
        return subprocess.run([sys.executable, __file__, "--library", str(library), "--cases", str(a.cases),
                               "--seed", str(a.seed)], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
