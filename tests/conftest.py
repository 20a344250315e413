"""Shared test fixtures: a small but realistic archive (graphs, templates, kernel images, snapshots)."""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from foundry_core import native, schema, trust
from foundry_core.archive import ArchiveWriter
from foundry_core.options import Options

ARENA_BASE = 0x6A0000000000
FINGERPRINT = schema.Fingerprint(
    gpu_name="NVIDIA H200",
    compute_capability="9.0",
    driver_version=13000,
    cuda_runtime="13.0",
    torch="2.11.0+cu130",
    triton="3.6.0",
    foundry="0.1.0",
    key="qwen3-8b|tp1|rank0|kv_pages=4096",
)


def _fake_cubin(seed: int, size: int) -> bytes:
    """ELF-looking bytes with the repetitiveness of real machine code (compresses, like real cubins)."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 64, size // 8, dtype=np.uint64)  # few distinct words
    return b"\x7fELF\x02\x01\x01\x33" + words.tobytes()[: size - 8]


def _graph_tables(rng, num_nodes: int, batch: int):
    nodes = np.zeros(num_nodes, schema.NODE_DTYPE)
    nodes["kind"] = schema.NODE_KERNEL
    nodes["kind"][0] = schema.NODE_MEMSET
    nodes["ref"] = np.arange(num_nodes) % 3
    nodes["grid"] = [batch, 1, 1]
    nodes["block"] = [128, 1, 1]
    nodes["payload_len"] = 24
    nodes["payload_off"] = np.arange(num_nodes) * 24
    nodes["attr_cnt"] = 2
    nodes["attr_off"] = np.arange(num_nodes) * 2
    payload = bytearray()
    for i in range(num_nodes):  # three device pointers into the arena per node
        payload += np.array([ARENA_BASE + 0x1000 * i + batch * 64, ARENA_BASE + 0x200000, batch], "<u8").tobytes()
    memset = np.zeros(1, schema.MEMSET_DTYPE)  # node 0 clears 4 KiB of the arena; its record goes last
    memset["dst"], memset["pitch"], memset["value"], memset["element_size"] = ARENA_BASE + 0x300000, 4096, 0, 4
    memset["width"], memset["height"] = 1024, 1
    nodes["payload_off"][0], nodes["payload_len"][0], nodes["attr_cnt"][0] = len(payload), memset.itemsize, 0
    payload += memset.tobytes()
    attrs = np.zeros(num_nodes * 2, schema.ATTR_DTYPE)
    attrs["id"][0::2] = 5  # cluster scheduling policy
    attrs["id"][1::2] = 9  # mem sync domain map
    return nodes.tobytes(), bytes(payload), attrs.tobytes()


def sample_archive(path: Path, *, graphs: int = 3, nodes: int = 12, image_size: int = 4096) -> dict[str, bytes]:
    """Write a realistic archive at ``path`` (signed, as SAVE signs, when the environment configures a key);
    returns every blob's original bytes by name."""
    rng = np.random.default_rng(7)
    blobs: dict[str, bytes] = {}
    images_bytes = [_fake_cubin(1, image_size), _fake_cubin(2, image_size // 2)]
    images = []
    for i, data in enumerate(images_bytes):
        sha = hashlib.sha256(data).hexdigest()
        blobs[f"images/{sha}"] = data
        images.append(schema.KernelImage(sha256=sha, blob=f"images/{sha}", size=len(data),
                                         kernels=[f"k{i}a", f"k{i}b"]))
    functions = [
        schema.KernelFunction(image=0, name="k0a", attributes={8: 232448}),
        schema.KernelFunction(image=0, name="k0b"),
        schema.KernelFunction(image=1, name="k1a"),
    ]
    edges = np.zeros(nodes - 1, schema.EDGE_DTYPE)
    edges["src"] = np.arange(nodes - 1)
    edges["dst"] = np.arange(1, nodes)
    edges["from_port"][::4] = 1  # programmatic dependent launch edges
    edges["type"][::4] = 1
    blobs["templates/0/edges"] = edges.tobytes()
    templates = [
        schema.GraphTemplate(num_nodes=nodes, kinds_sha256="ab" * 32, edges="templates/0/edges", num_edges=nodes - 1)
    ]
    records = []
    for g in range(graphs):
        batch = 2**g
        key = f"decode_bs{batch}"
        node_bytes, payload, attrs = _graph_tables(rng, nodes, batch)
        blobs[f"graphs/{key}/nodes"] = node_bytes
        blobs[f"graphs/{key}/payload"] = payload
        blobs[f"graphs/{key}/attrs"] = attrs  # identical for every graph: deduped
        out = schema.TensorSpec(
            address=ARENA_BASE + 0x40000000 + g * 0x100000,
            dtype="bfloat16",
            shape=[batch, 4096],
            strides=[4096, 1],
            storage_bytes=batch * 4096 * 2,
        )
        records.append(
            schema.GraphRecord(
                key=key,
                template=0,
                nodes=f"graphs/{key}/nodes",
                payload=f"graphs/{key}/payload",
                attrs=f"graphs/{key}/attrs",
                num_kernel_nodes=nodes - 1,
                outputs=[out],
                capture_seconds=0.25,
            )
        )
    blobs["snapshots/0"] = rng.bytes(3000)  # random: stays raw
    # inside the capture region (warm-up buffers are allocated there; LOAD refuses snapshots anywhere else)
    snapshots = [schema.MemorySnapshot(address=ARENA_BASE + (17 << 30) + 0x1000, size=3000, blob="snapshots/0",
                                       note="rope")]
    manifest = schema.Manifest(
        schema_version=schema.SCHEMA_VERSION,
        created_utc="2026-11-28T12:00:00Z",
        fingerprint=FINGERPRINT,
        arena=schema.ArenaLayout(
            base=ARENA_BASE, size=80 << 30, granularity=2 << 20, capture_start=17 << 30,
            capture_end=(17 << 30) + (6 << 20),
        ),
        blobs={},
        images=images,
        functions=functions,
        templates=templates,
        graphs=records,
        snapshots=snapshots,
        num_events=0,
        extra={"kv_pages": "4096"},
    )
    with ArchiveWriter(path, sign_key=trust.configured_key(Options.from_env())) as writer:
        for name, data in blobs.items():
            writer.add_blob(name, data)
        writer.finish(manifest)
    return blobs


@pytest.fixture
def archive_file(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """(path, blobs by name) of a freshly written sample archive."""
    path = tmp_path / "model.foundry"
    return path, sample_archive(path)


def rewrite_manifest(path: Path, manifest_doc) -> None:
    """Replace the archive's manifest with ``manifest_doc`` (any msgpack-able object), fixing the header's
    size and sha256 so that only the reader's decoding and validation can object."""
    import msgspec

    from foundry_core.archive import HEADER

    data = bytearray(path.read_bytes())
    magic, version, flags, offset, _, _ = HEADER.unpack_from(data)
    encoded = msgspec.msgpack.encode(manifest_doc)
    del data[offset:]
    data += encoded
    HEADER.pack_into(data, 0, magic, version, flags, offset, len(encoded), hashlib.sha256(encoded).digest())
    path.write_bytes(bytes(data))


def returns_within(seconds: float, fn, *args):
    """``fn(*args)``, or AssertionError when it has not returned after ``seconds`` (it blocked: a FIFO, a device)."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn(*args)
        except BaseException as err:  # re-raised on the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise AssertionError(f"{getattr(fn, '__qualname__', fn)} still running after {seconds} s (blocked)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# -- CI: a skip for a missing required dependency is a failure ------------------------------------------------------
#: Comma-separated requirements whose absence must fail the run instead of skipping tests: top-level modules
#: (e.g. "sglang,transformers,ray") and the tools of :data:`TOOLS`; .ci/run sets it, so a broken install cannot
#: silently turn tests off.
REQUIRED_ENV = "FOUNDRY_CI_REQUIRE"
#: Requirements that are not modules: what building foundry's native helpers needs.
TOOLS = {"cc": "a C compiler", "cuda_h": "the CUDA driver API header cuda.h"}
_TOOLS_PREFIX = "missing requirement: "


def missing_tools() -> str | None:
    """The skip reason of a test that builds the native helpers, when this machine cannot (None when it can); it
    names the requirements so that FOUNDRY_CI_REQUIRE can turn the skip into a failure."""
    missing = [name for name, present in (("cc", native.c_compiler()), ("cuda_h", native.cuda_include_dirs()))
               if not present]
    return _TOOLS_PREFIX + ", ".join(f"{name} ({TOOLS[name]})" for name in missing) if missing else None


def _missing_required(report) -> str | None:
    required = [m.strip() for m in os.environ.get(REQUIRED_ENV, "").split(",") if m.strip()]
    if not required or not report.skipped:
        return None
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    tools = reason.split(_TOOLS_PREFIX, 1)[1] if _TOOLS_PREFIX in reason else ""
    for name in required:
        if (f"could not import '{name}'" in reason or f"could not import '{name}." in reason
                or (name in TOOLS and f"{name} (" in tools)):
            return f"{REQUIRED_ENV} requires {name}, but the test skipped: {reason}"
    return None


def _fail_if_required(report) -> None:
    why = _missing_required(report)
    if why:
        report.outcome = "failed"
        report.longrepr = why


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_required(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_if_required(outcome.get_result())
