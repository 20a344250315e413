"""foundry_sglang.graphs: the one mode/config definition, the one key scheme, the one fallback policy."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from foundry_core.errors import ArchiveError, UnsupportedGraph
from foundry_sglang.graphs import FoundryConfig, FoundryMode, GraphRouter, RankLayout, archive_key, layout_dir
from foundry_sglang.graphs.router import shape_key_name

REPO = Path(__file__).resolve().parents[2]


# -- settings --------------------------------------------------------------------------------------
def test_one_default_rule():
    assert FoundryConfig.resolve().mode is FoundryMode.OFF
    assert FoundryConfig.resolve(None, "/a") == FoundryConfig(FoundryMode.AUTO, Path("/a"))
    assert FoundryConfig.resolve(" LOAD ", "/a").mode is FoundryMode.LOAD
    assert FoundryConfig.resolve("off").enabled is False
    with pytest.raises(ValueError, match="needs an archive directory"):
        FoundryConfig.resolve("save")
    with pytest.raises(ValueError, match="not one of off, auto, save, load"):
        FoundryConfig.resolve("sometimes", "/a")


def test_config_round_trips_through_the_environment():
    config = FoundryConfig.resolve("load", "/data/foundry")
    assert FoundryConfig.from_env(config.to_env()) == config
    assert FoundryConfig.from_env({}) == FoundryConfig()
    assert FoundryConfig.from_env({"FOUNDRY_MODE": "save"}, default_archive_dir="/d").archive_dir == Path("/d")


def test_config_from_a_mapping_and_as_engine_flags():
    config = FoundryConfig.resolve("save", "/data/foundry")
    assert FoundryConfig.from_dict({"mode": "save", "archive_dir": "/data/foundry"}) == config
    assert FoundryConfig.from_dict({"archive_dir": "/d"}).mode is FoundryMode.AUTO  # the one default rule
    assert FoundryConfig.from_dict({}) == FoundryConfig()
    with pytest.raises(ValueError, match="unknown foundry setting.*archive_root"):
        FoundryConfig.from_dict({"archive_root": "/d"})
    with pytest.raises(ValueError, match="needs an archive directory"):
        FoundryConfig.from_dict({"mode": "load"})
    per_layout = config.with_archive_dir("/data/foundry/m/tp2")
    assert per_layout == FoundryConfig(FoundryMode.SAVE, Path("/data/foundry/m/tp2"))
    assert per_layout.engine_flags() == ["--foundry-archive", "/data/foundry/m/tp2", "--foundry-mode", "save"]
    assert FoundryConfig().engine_flags() == []


def test_mode_values_are_defined_once():
    """No other module spells the mode names as a list or compares a mode with a string literal."""
    name = r"""["'](?:off|auto|save|load)["']"""
    listed = re.compile(rf"{name}\s*,\s*{name}")  # ("save", "load"), choices=["off", "auto", ...]
    compared = re.compile(rf"mode\w*\s*(?:[!=]=|in|not in|=|:\s*str\s*=)\s*[(\[]?{name}")
    offenders = []
    for path in sorted((REPO / "foundry_sglang").rglob("*.py")):
        if path.relative_to(REPO).as_posix() == "foundry_sglang/graphs/settings.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if listed.search(line) or compared.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []


# -- keys ------------------------------------------------------------------------------------------
def test_per_rank_and_rank_free_keys():
    r0, r1 = RankLayout(tp_size=2, tp_rank=0), RankLayout(tp_size=2, tp_rank=1)
    a, b = archive_key("builtin", "/m/Qwen3-8B/", {"x": 1}, r0), archive_key("builtin", "/m/Qwen3-8B", {"x": 1}, r1)
    assert a.key != b.key and a.file_name.startswith("Qwen3-8B-tp2r0-") and b.file_name.startswith("Qwen3-8B-tp2r1-")
    ta = archive_key("builtin", "/m/Qwen3-8B", {"x": 1}, r0, per_rank=False)
    tb = archive_key("builtin", "/m/Qwen3-8B", {"x": 1}, r1, per_rank=False)
    assert ta == tb and ta.file_name.startswith("Qwen3-8B-tp2-") and ta.key != a.key
    assert archive_key("sglang", "m", {"x": 1}, r0).key.startswith("sglang:")
    assert archive_key("builtin", "m", {"x": 2}, r0).key != archive_key("builtin", "m", {"x": 1}, r0).key


def test_layout_dir_is_rank_free():
    assert layout_dir("/data", "/models/Qwen3-8B/", RankLayout(tp_size=2, tp_rank=1)) == Path("/data/Qwen3-8B/tp2")
    assert layout_dir("/data", "builtin:tiny", RankLayout(ep_size=2)).name == "tp1-ep2"


# -- router ----------------------------------------------------------------------------------------
def test_shape_key_names():
    assert shape_key_name(8) == "decode_bs8" and shape_key_name((8, 0)) == "decode_8_0"
    assert shape_key_name("prefill") == "prefill"


class SaveSession:
    """Stands in for a SAVE-mode Session whose add_graph/save can fail the way foundry_core reports it."""

    def __init__(self, requested="save", fail_add=False, fail_save=False):
        self.requested_mode, self.mode, self.path = requested, None, "m.foundry"
        self.fail_add, self.fail_save = fail_add, fail_save
        self.added, self.saved, self.closed = [], None, False

    def open(self):
        self.mode = "save"

    def close(self):
        self.closed = True

    def add_graph(self, name, graph, outputs, seconds=0.0):
        if self.fail_add:
            raise UnsupportedGraph(f"{name}: host callback node 3 refused")
        self.added.append(name)

    def save(self, extra=None):
        if self.fail_save:
            raise ArchiveError("m.foundry: disk full")
        self.saved = dict(extra or {})
        return self.path


def _route(router, names):
    live = []
    for name in names:
        router.capture_one(name, install=lambda g: pytest.fail("nothing to restore in SAVE"),
                           capture=lambda: ("graph", "out", 0.1), capture_live=lambda n=name: live.append(n))
    return live


def test_auto_save_problem_serves_live_graphs_with_one_line(caplog):
    router = GraphRouter(SaveSession("auto", fail_add=True), "auto")
    assert router.open() == "save"
    with caplog.at_level("WARNING"):
        live = _route(router, ["decode_bs8", "decode_bs4"])
    assert live == ["decode_bs4"] and router.recorded == [] and router.route == "live"
    assert router.save({"k": "v"}) is None and not router.session.closed  # the capture phase keeps its pool
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "host callback" in warnings[0]


def test_a_graph_that_cannot_be_captured_for_the_archive_is_captured_live_with_the_rest(caplog):
    from foundry_sglang.comm_patch import UnsupportedCollective

    def refuse():
        raise UnsupportedCollective("GroupCoordinator.broadcast on group 'tp:0' inside a decode graph cannot be saved")

    router = GraphRouter(SaveSession("auto"), "auto")
    router.open()
    live = []
    with caplog.at_level("WARNING"):
        router.capture_one("decode_bs8", install=None, capture=lambda: ("graph", "out", 0.1),
                           capture_live=lambda: live.append("decode_bs8"))
        router.capture_one("decode_bs4", install=None, capture=refuse, capture_live=lambda: live.append("decode_bs4"))
        router.capture_one("decode_bs1", install=None, capture=lambda: pytest.fail("SAVE stopped"),
                           capture_live=lambda: live.append("decode_bs1"))
    assert router.recorded == ["decode_bs8"] and live == ["decode_bs4", "decode_bs1"] and router.route == "live"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "broadcast" in warnings[0] and "decode_bs4" in warnings[0]
    strict = GraphRouter(SaveSession("save"), "save")
    strict.open()
    with pytest.raises(UnsupportedCollective):
        strict.capture_one("decode_bs4", install=None, capture=refuse, capture_live=lambda: None)


@pytest.mark.parametrize("fail", ["fail_add", "fail_save"])
def test_explicit_save_is_strict(fail):
    router = GraphRouter(SaveSession("save", **{fail: True}), "save")
    router.open()
    with pytest.raises((UnsupportedGraph, ArchiveError)):
        _route(router, ["decode_bs8"])
        router.save({})


def test_save_writes_what_was_recorded():
    router = GraphRouter(SaveSession("save"), "save")
    router.open()
    assert _route(router, ["decode_bs8", "decode_bs1"]) == []
    assert router.save({"k": "v"}) == "m.foundry" and router.session.added == ["decode_bs8", "decode_bs1"]


def test_bugs_are_not_swallowed():
    class Broken(SaveSession):
        def restore(self, order=None):
            raise TypeError("a bug, not a LOAD problem")

        def open(self):
            self.mode = "load"

    router = GraphRouter(Broken("load"), "load")
    router.open()
    with pytest.raises(TypeError):
        router.restore()


def test_off_has_no_router():
    with pytest.raises(ValueError):
        GraphRouter(SaveSession(), "off")
