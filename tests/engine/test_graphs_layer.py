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



def _python_sources():
    import ast

    for path in sorted((REPO / "foundry_sglang").rglob("*.py")):
        yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text())


def test_every_foundry_variable_is_named_in_one_home_and_read_in_one_place():
    """FOUNDRY_* names are string constants of graphs/settings.py (the settings) and proc.py (the environment
    between our own processes) only, and each is read (get, pop, [ ]) in exactly one place. Before: nine modules
    spelled them, FOUNDRY_MODE was read in four places and FOUNDRY_STANDBY_READY_FD named twice."""
    import ast

    from foundry_sglang import proc
    from foundry_sglang.graphs import settings

    constants = {k for k, v in vars(settings).items() if k.startswith("ENV_") and isinstance(v, str)}
    constants |= {k for k, v in vars(proc).items() if k.endswith("_ENV") and isinstance(v, str)}
    homes = {"foundry_sglang/graphs/settings.py", "foundry_sglang/proc.py"}
    named, reads = [], {c: [] for c in constants}
    for where, tree in _python_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"FOUNDRY_[A-Z_]+", node.value) and where not in homes:
                named.append(f"{where}:{node.lineno}: {node.value}")
            key = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("get", "pop") and node.args and isinstance(node.args[0], ast.Name):
                key = node.args[0].id
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) \
                    and isinstance(node.slice, ast.Name):
                key = node.slice.id
            if key in reads:
                reads[key].append(f"{where}:{node.lineno}")
    assert named == []
    assert {c: len(r) for c, r in reads.items() if len(r) != 1} == {}, reads


def test_foundry_flags_are_defined_once():
    """Every parser takes --foundry-archive/--foundry-mode from settings.add_foundry_flags (before: three
    definitions, with two spellings of the help), and they mean the same everywhere."""
    import ast

    from foundry_sglang import launch
    from foundry_sglang.elastic import launch as elastic_launch
    from foundry_sglang.engine.flags import build_arg_parser

    spelled = [f"{where}:{n.lineno}" for where, tree in _python_sources() for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and n.value in ("--foundry-archive", "--foundry-mode")
               and where != "foundry_sglang/graphs/settings.py"]
    assert spelled == []
    argv = ["--foundry-archive", "/data/f", "--foundry-mode", "load"]
    parsed = [launch.build_parser().parse_known_args(argv)[0], build_arg_parser().parse_args(argv),
              elastic_launch.build_parser().parse_args(argv)]
    assert {FoundryConfig.from_flags(ns, {}) for ns in parsed} == {FoundryConfig.resolve("load", "/data/f")}


def test_flags_win_over_the_environment_only_where_a_front_end_asks():
    import argparse

    from foundry_sglang.graphs.settings import add_foundry_flags

    parser = argparse.ArgumentParser()
    add_foundry_flags(parser)
    env = {"FOUNDRY_MODE": "save", "FOUNDRY_ARCHIVE": "/env", "FOUNDRY_EARLY_LOAD": "1",
           "FOUNDRY_RANKS_SHARE_GPU": "1"}
    none = parser.parse_args([])
    assert FoundryConfig.from_flags(none, env) == FoundryConfig(early_load=True)  # the engine's server: flags only
    assert FoundryConfig.from_flags(none, env, env_defaults=True) == FoundryConfig(
        FoundryMode.SAVE, Path("/env"), ranks_share_gpu=True, early_load=True)
    flagged = parser.parse_args(["--foundry-mode", "load", "--foundry-archive", "/flag"])
    assert FoundryConfig.from_flags(flagged, env, env_defaults=True).archive_dir == Path("/flag")
    assert FoundryConfig.from_flags(none, {}, default_archive_dir="/d") == FoundryConfig.resolve("auto", "/d")
    config = FoundryConfig.from_env(env)
    assert FoundryConfig.from_env(config.to_env()) == config and FoundryConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="FOUNDRY_MODE='sometimes'"):
        FoundryConfig.from_env({"FOUNDRY_MODE": "sometimes"})


def test_strictness_is_one_rule():
    """FoundryMode.strict decides everywhere whether a problem raises: only an explicit save. Before, the router
    treated load as lenient while the SGLang plugin raised on refused flags in load mode."""
    import ast

    from foundry_sglang.plugin.flags import UnsafeFlag, check_flags

    assert [m.value for m in FoundryMode if m.strict] == ["save"]
    assert GraphRouter(SaveSession("save"), "save").strict and not GraphRouter(SaveSession("load"), "load").strict
    unsafe = {"enable_memory_saver": True, "cuda_graph_backend_prefill": "disabled"}
    assert "--enable-memory-saver" in check_flags(unsafe, "load") and check_flags(unsafe, "auto")
    with pytest.raises(UnsafeFlag):
        check_flags(unsafe, "save")

    def raises(statements) -> bool:  # a raise not under an `if ... .strict`
        for st in statements:
            if isinstance(st, ast.Raise):
                return True
            if isinstance(st, ast.If) and ".strict" in ast.unparse(st.test):
                continue
            inner = [getattr(st, f, []) for f in ("body", "orelse", "finalbody")]
            inner += [h.body for h in getattr(st, "handlers", [])]
            if any(raises(block) for block in inner if isinstance(block, list)):
                return True
        return False

    decided = []  # an `if` on the mode being save/load whose branch raises: a second copy of the rule
    for where, tree in _python_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and re.search(r"FoundryMode\.(SAVE|LOAD)", ast.unparse(node.test)) \
                    and raises(node.body):
                decided.append(f"{where}:{node.lineno}: {ast.unparse(node.test)}")
    assert decided == []


def test_route_is_not_a_mode():
    from foundry_core.session import SessionMode
    from foundry_sglang.graphs.router import Route

    assert {Route.SAVE.value, Route.LOAD.value} == {SessionMode.SAVE.value, SessionMode.LOAD.value}
    assert Route.of(SessionMode.LOAD) is Route.LOAD and "live" not in {m.value for m in FoundryMode}
    assert "auto" not in {r.value for r in Route}


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


def test_a_load_says_when_the_engine_asked_for_its_first_graph(caplog):
    """One line per LOAD process: the time from the restore to the engine's first request for a graph is the
    engine's own preparation (SGLang's per-size set-up), which the start benchmark needs apart from ours."""
    from foundry_sglang.graphs.router import FIRST_INSTALL_MESSAGE

    class LoadSession(SaveSession):
        def open(self):
            self.mode = "load"

        def restore(self, order=None):
            return {"decode_bs8": "g8", "decode_bs4": "g4"}

    router = GraphRouter(LoadSession("auto"), "auto")
    assert router.open() == "load"
    installed = []
    with caplog.at_level("INFO", logger="foundry_sglang.graphs"):
        for name in ("decode_bs8", "decode_bs4"):
            router.capture_one(name, install=installed.append, capture=lambda: pytest.fail("no capture in LOAD"),
                               capture_live=lambda: pytest.fail("nothing live"))
    assert installed == ["g8", "g4"] and router.restored_names == ["decode_bs8", "decode_bs4"]
    lines = [r.getMessage() for r in caplog.records if "handed to the engine" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(FIRST_INSTALL_MESSAGE.split("(")[0] + "(decode_bs8)")


def test_a_load_says_where_the_engine_was_until_it_asked_for_its_first_graph(caplog):
    """The line after the first-graph one names the engine code that ran between the restore and that request
    (sampled from another thread), so a slow start is explained by its log."""
    import time

    from foundry_sglang.graphs.router import ENGINE_WAIT_MESSAGE

    class LoadSession(SaveSession):
        def open(self):
            self.mode = "load"

        def restore(self, order=None):
            return {"decode_bs8": "g8"}

    def prepare_the_first_batch():
        time.sleep(0.15)

    router = GraphRouter(LoadSession("load"), "load")
    router.open()
    with caplog.at_level("INFO", logger="foundry_sglang.graphs"):
        router.restore()
        prepare_the_first_batch()
        router.capture_one("decode_bs8", install=lambda g: None, capture=lambda: pytest.fail("no capture"),
                           capture_live=lambda: pytest.fail("nothing live"))
    (line,) = [r.getMessage() for r in caplog.records if r.msg == ENGINE_WAIT_MESSAGE]
    assert "test_graphs_layer.py:prepare_the_first_batch" in line.split(":", 2)[2], line
    share = int(line.split("): ", 1)[1].split("%", 1)[0])
    assert share >= 80, line  # the sleep is nearly all of the stretch
    assert not any(t.name == "foundry-stack-sampler" for t in __import__("threading").enumerate())


def test_off_has_no_router():
    with pytest.raises(ValueError):
        GraphRouter(SaveSession(), "off")
