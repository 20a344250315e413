"""CPU tests of foundry_sglang.builtin.backend (the engine's adapter over the graphs router): archive keys/paths
for the built-in engine, LOAD routing and the fallback policy.

SAVE needs a GPU (warm-ups and torch.cuda.graph) and is covered by tests/gpu/test_launch.py and the benchmark;
LOAD routing only looks graphs up, so it is tested here with a small restore stand-in (no CUDA involved).
"""
from types import SimpleNamespace

import pytest

from foundry_core.errors import FoundryError
from foundry_sglang.builtin.backend import FoundryGraphBackend
from foundry_sglang.engine.config import EngineArgs
from foundry_sglang.graphs.router import shape_key_name
from foundry_sglang.graphs.settings import FoundryConfig


def test_shape_key_names():
    assert shape_key_name(8) == "decode_bs8"
    assert shape_key_name((8, 0)) == "decode_8_0"
    assert shape_key_name("prefill") == "prefill"


def _backend(tmp_path, rank=0, **changes):
    args = EngineArgs(model="builtin:tiny", foundry=FoundryConfig.resolve("auto", tmp_path), **changes)
    return FoundryGraphBackend.from_engine_args(args, rank=rank)


def test_engine_archives_are_per_layout_and_rank_and_keyed_by_graph_inputs(tmp_path):
    base = _backend(tmp_path)
    assert base.session.path.parent == tmp_path and base.session.path.suffix == ".foundry"
    assert base.session.path.name.startswith("builtin_tiny-tp1r0-") and base.session.key.startswith("builtin:")
    for change in ({"page_size": 32}, {"cuda_graph_bs": [1, 2]}, {"max_num_seqs": 64}, {"num_kv_pages": 99},
                   {"seed": 1}, {"dtype": "float16"}, {"max_model_len": 512}):
        other = _backend(tmp_path, **change)
        assert other.session.key != base.session.key, change
        assert other.session.path != base.session.path, change
    assert _backend(tmp_path).session.key == base.session.key  # deterministic
    # A TP/EP layout has one rank template: no rank in its key or path; the rank only picks the delta at LOAD.
    r0, r1 = _backend(tmp_path, rank=0, tp=2), _backend(tmp_path, rank=1, tp=2)
    assert r0.session.path == r1.session.path and r0.session.key == r1.session.key
    assert "-tp2-" in r1.session.path.name and "r1" not in r1.session.path.name.split("-tp2-")[0][-3:]
    assert (r0.session.rank, r1.session.rank) == (0, 1) and base.session.rank is None
    assert r1.session.requested_mode == "load" and r1.target.requested == "auto"  # rank 0 saves the template first
    assert r1.router.requested == "load" and r1.target.is_template and not base.target.is_template
    assert _backend(tmp_path, rank=1, ep=2).session.path not in (r0.session.path, base.session.path)


def test_archive_flag_alone_means_auto(tmp_path):
    args = EngineArgs(model="builtin:tiny", foundry=FoundryConfig.resolve(None, tmp_path))
    assert FoundryGraphBackend.from_engine_args(args).session.requested_mode == "auto"


class RestoreStandIn:
    """Stands in for an opened LOAD-mode foundry_core.Session: restore() hands out named outputs."""

    def __init__(self, names, extra=None):
        graphs = [SimpleNamespace(key=n, is_child=False) for n in names]
        self.archive = SimpleNamespace(manifest=SimpleNamespace(graphs=graphs, extra=extra or {}, slots=[]))
        self.requested_mode = "load"
        self.mode = None
        self.path = "stand-in.foundry"
        self.order = None
        self.closed = False

    def open(self):
        self.mode = "load"

    def close(self):
        self.closed = True

    def restore(self, order, slot_filler=None):
        self.order = order
        keys = [g.key for g in self.archive.manifest.graphs]
        return {k: SimpleNamespace(outputs=f"out-{k}", replay=lambda: None, reset=lambda: None) for k in keys}


def test_load_routing_restores_smallest_first_and_never_runs_forward():
    names = [shape_key_name(b) for b in (256, 16, 8, 2, 1)]  # archive order: captured largest first
    session = RestoreStandIn(names, extra={"num_kv_pages": "123"})
    backend = FoundryGraphBackend(session)
    backend.before_allocations()
    assert backend.router.route == "load" and backend.saved_extra == {"num_kv_pages": "123"}
    with backend.capture_session(stream=None):
        for bs in (256, 16, 8, 2, 1):
            backend.capture_one(bs, lambda: pytest.fail("LOAD must not run the forward"))
    assert session.order == ["decode_bs1", "decode_bs2", "decode_bs8", "decode_bs16", "decode_bs256"]
    assert backend.can_run(8) and not backend.can_run(4)
    assert backend._outputs[16] == "out-decode_bs16"
    assert backend.router.restored_names == names and backend.router.live_names == []


def test_load_routing_captures_a_missing_graph_live(monkeypatch, caplog):
    session = RestoreStandIn([shape_key_name(1)])
    backend = FoundryGraphBackend(session)
    backend.before_allocations()
    live = []
    monkeypatch.setattr(backend, "_capture", lambda key, fn: live.append(key))
    with caplog.at_level("WARNING"), backend.capture_session(stream=None):
        backend.capture_one(1, lambda: pytest.fail("restored graphs never run the forward"))
        backend.capture_one(4, lambda: None)
    assert live == [4] and backend.router.restored_names == ["decode_bs1"]
    assert backend.router.live_names == ["decode_bs4"]
    assert "has no graph decode_bs4" in caplog.text and session.closed  # live capture outside the arena


class FailingRestore(RestoreStandIn):
    def restore(self, order):
        raise FoundryError("archive stand-in.foundry: blob images/x sha256 mismatch")


def test_restore_failure_falls_back_to_live_capture_with_one_line(monkeypatch, caplog):
    backend = FoundryGraphBackend(FailingRestore([shape_key_name(1)]))
    backend.before_allocations()
    live = []
    monkeypatch.setattr(backend, "_capture", lambda key, fn: live.append(key))
    monkeypatch.setattr("foundry_sglang.builtin.backend.torch.cuda.graph_pool_handle", lambda: "torch-pool")
    with caplog.at_level("WARNING"), backend.capture_session(stream="s"):
        backend.capture_one(1, lambda: None)
    assert live == [1] and backend.router.route == "live" and backend.session.closed
    assert "sha256 mismatch" in backend.fallback_reason
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


class UnopenableSession:
    """Stands in for a Session whose open() fails the way foundry_core reports it (arena range taken)."""

    def __init__(self, requested_mode):
        self.requested_mode = requested_mode
        self.mode = None
        self.path = "model.foundry"
        self.closed = False

    def open(self):
        from foundry_core.errors import ArenaUnavailable

        raise ArenaUnavailable("arena range 0x6a0000000000-0x6b0000000000 on cuda:0 is not free")

    def close(self):
        self.closed = True


@pytest.mark.parametrize("mode", ["auto", "load"])
def test_unusable_arena_falls_back_to_live_capture_with_one_line(mode, caplog):
    backend = FoundryGraphBackend(UnopenableSession(mode))
    with caplog.at_level("WARNING"):
        backend.before_allocations()
    assert backend.router.route == "live" and backend.saved_extra == {} and backend.session.closed
    assert "capturing CUDA graphs live" in caplog.text and "not free" in caplog.text
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


def test_explicit_save_keeps_the_error():
    from foundry_core.errors import ArenaUnavailable

    with pytest.raises(ArenaUnavailable):
        FoundryGraphBackend(UnopenableSession("save")).before_allocations()


def test_flags_are_resolved_once_and_each_rank_target_carries_both_modes(tmp_path):
    """EngineArgs carries the resolved FoundryConfig (one field), and archive_target computes per rank what the
    user asked for and what the rank's session does; before, the raw flag strings were re-resolved at each use,
    LOAD was forced in keys.py and the requested mode brought back in the backend."""
    import dataclasses
    import json

    from foundry_core.session import SessionMode
    from foundry_sglang.builtin.keys import archive_target
    from foundry_sglang.engine.flags import build_arg_parser, engine_args_from

    argv = ["--foundry-archive", str(tmp_path), "--foundry-mode", "save", "--tp", "2"]
    args = engine_args_from(build_arg_parser().parse_args(argv))
    assert args.foundry == FoundryConfig.resolve("save", tmp_path)
    assert not {"foundry_mode", "foundry_archive"} & {f.name for f in dataclasses.fields(EngineArgs)}
    rank1 = archive_target(args, 1)
    assert (rank1.requested, rank1.mode, rank1.session_mode, rank1.rank) == ("save", "load", SessionMode.LOAD, 1)
    single = archive_target(dataclasses.replace(args, tp=1), 0)
    assert (single.requested, single.mode, single.rank, single.is_template) == ("save", "save", None, False)
    backend = FoundryGraphBackend.from_engine_args(args, rank=1)
    assert backend.target == rank1 and backend.router.requested == "load" and not backend.router.strict
    # a rank template's virtual ranks get the arguments as JSON
    assert EngineArgs(**json.loads(json.dumps(args.to_dict()))) == args


def test_a_layout_whose_ranks_share_a_gpu_has_its_own_archive(tmp_path):
    """Ranks that share a GPU split its KV memory, and LOAD forces the pool SAVE recorded: a template saved for one
    GPU per rank would not fit two ranks on one GPU (and the other way round, the pool would be half). The number
    of ranks per GPU is in the key whenever the pool is derived from the memory."""
    import dataclasses

    from foundry_sglang.builtin.keys import archive_target

    args = EngineArgs(model="builtin:tiny", tp=2, foundry=FoundryConfig.resolve("auto", tmp_path))
    apart, shared = archive_target(args), archive_target(dataclasses.replace(args, gpu_ids=[0, 0]))
    assert apart.key != shared.key and apart.path != shared.path
    assert archive_target(dataclasses.replace(args, gpu_ids=[1, 0])).key == apart.key
    fixed = dataclasses.replace(args, num_kv_pages=512)  # an explicit pool: the same graphs wherever the ranks run
    assert archive_target(fixed).key == archive_target(dataclasses.replace(fixed, gpu_ids=[0, 0])).key
