"""bench/sglang_start.py on CPU: SGLang 0.5.17's log lines split into phases, TPOT and spread math, the verdict
rows, the JSON record (merge, plot), and one whole run against a stand-in server that speaks SGLang's HTTP API
and logs its start-up lines (gpu/sglang_servers.py's Server, requests and stop)."""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
from gpu import sglang_servers
from gpu.sglang_servers import Server

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_sglang_start", REPO / "bench" / "sglang_start.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_sglang_start"] = module
    spec.loader.exec_module(module)
    return module


bench = _load()

#: SGLang 0.5.17's start-up lines as its f-strings render them (SGLANG_LOG_MS=1): entrypoints/engine.py,
#: distributed/bootstrap.py, model_executor/model_runner.py, mem_cache/kv_cache_configurator.py,
#: model_executor/model_runner_components/cuda_graph_setup.py, entrypoints/http_server.py.
LINES = [
    (0.0, "server_args=ServerArgs(model_path='/tmp/m', tokenizer_path='/tmp/m', load_format='dummy')"),
    (6.0, "Init torch distributed begin."),
    (6.7, "Init torch distributed ends. elapsed=0.70 s, mem usage=0.09 GB"),
    (6.8, "Load weight begin. avail mem=78.52 GB"),
    (8.3, "Load weight end. elapsed=1.50 s, type=Qwen3ForCausalLM, avail mem=62.80 GB, mem usage=15.72 GB."),
    (8.6, "KV Cache is allocated. #tokens: 65536, K size: 4.50 GB, V size: 4.50 GB"),
    (8.8, "Memory pool end. avail mem=53.70 GB"),
    (9.0, "Capture target decode CUDA graph begin. backend=full, num_tokens_per_req=1, bs=[1, 2, 4, 8], "
          "avail mem=53.60 GB"),
    (13.0, "Capture target decode CUDA graph end. elapsed=4.00 s, mem usage=0.61 GB, avail mem=52.99 GB."),
    (13.5, "Engine startup timings (s): load_weight=1.50, kv_cache_allocation=0.49, scheduler_e2e=7.40, "
           "cuda_graph={prefill=0.00, decode=4.00}, tokenizer_e2e=13.40"),
    (13.9, "The server is fired up and ready to roll!"),
]
T0 = datetime.datetime(2026, 12, 8, 10, 0, 5).timestamp()


def stamp(t: float, prefix: str = "") -> str:
    d = datetime.datetime.fromtimestamp(T0 + t)
    return f"[{d:%Y-%m-%d %H:%M:%S}.{d.microsecond // 1000:03d}{prefix}]"


def log_text(skip=(), prefix="") -> str:
    out = ["WARNING: 'python -m sglang.launch_server' is still supported"]  # lines without a stamp are ignored
    out += [f"{stamp(t, prefix if 'Init' in m or 'Load' in m else '')} {m}" for t, m in LINES
            if not any(s in m for s in skip)]
    return "\n".join(out) + "\n"


def test_phases_from_the_log_lines():
    marks = bench.log_marks(log_text(prefix=" TP0"))
    assert set(marks) == {p for p, m in bench.PHASE_MARKS if m}
    ph = bench.phases(marks, T0 - 20.0, healthy_s=34.0)
    want = {"imports": 20.0, "tokenizer_manager": None, "scheduler_spawn": 6.0, "distributed": 0.8, "weights": 1.5,
            "kv_pool": 0.5, "attention": 0.2, "graphs": 4.0, "scheduler_rest": 0.5, "warmup": 0.4, "health": 0.1}
    assert set(ph) == set(bench.PHASES) == set(want)
    for phase, value in want.items():
        assert ph[phase] == (None if value is None else pytest.approx(value, abs=2e-3)), phase
    assert sum(v for v in ph.values() if v) == pytest.approx(34.0, abs=2e-3)  # the phases add up to healthy


def test_an_eager_start_has_no_graph_lines_and_their_time_lands_in_the_next_phase():
    ph = bench.phases(bench.log_marks(log_text(skip=("Capture",))), T0 - 20.0, healthy_s=None)
    assert ph["attention"] is None and ph["graphs"] is None and ph["health"] is None
    assert ph["scheduler_rest"] == pytest.approx(13.5 - 8.8, abs=2e-3)


def test_stamps_without_milliseconds_still_parse():
    assert bench.stamp_seconds("2026-12-08 10:00:05") == T0
    assert bench.stamp_seconds("2026-12-08 10:00:05.250") == pytest.approx(T0 + 0.25)


def test_phase_differences_merge_what_one_side_lacks():
    load = {p: 1.0 for p in bench.PHASES}
    load["tokenizer_manager"] = None
    eager = dict(load, attention=None, graphs=None, scheduler_rest=2.5)
    diffs = bench.phase_diffs(load, eager)
    assert diffs["attention+graphs+scheduler_rest"] == pytest.approx(0.5) and diffs["imports"] == 0.0
    assert "tokenizer_manager" not in diffs and "graphs" not in diffs
    assert bench.phase_diffs({"health": None}, {"imports": 1.0}) == {"imports": -1.0}


def test_tpot_spread_and_median_start():
    marks = [(0.0, 1), (0.1, 2), (0.2, 3), (0.25, 4), (0.30, 5)]
    assert bench.stream_tpot_ms(marks) == pytest.approx(50.0)
    assert bench.stream_tpot_ms(marks, skip=0) == pytest.approx(75.0)
    assert bench.stream_tpot_ms(marks[:3]) is None and bench.stream_tpot_ms([]) is None
    assert bench.spread([3.0, None, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert bench.spread([None]) is None
    starts = [{"ok": True, "healthy_s": h, "round": i} for i, h in enumerate([5.0, 3.0, 4.0, 9.0])]
    assert bench.median_start(starts + [{"ok": False}])["healthy_s"] == 4.0
    assert bench.median_start([{"ok": False}]) is None


def fake_start(mode, rnd, healthy, graph_s, restored=None, ok=True, phase_extra=0.0):
    ph = {p: 0.5 for p in bench.PHASES}
    ph.update(tokenizer_manager=None, imports=20.0 + phase_extra)
    graphs = {"decode_graph_phase_s": graph_s, "bs": [1, 2, 4], "tracebacks": 0, "fallback_lines": []}
    if mode == "eager":
        ph.update(attention=None, graphs=None)
        graphs = {"tracebacks": 0, "fallback_lines": []}
    if restored is not None:
        graphs.update(restored=restored, live=3 - restored, recorded=0, restore_s=0.1)
    st = {"mode": mode, "ok": ok, "round": rnd, "run": 0, "phases_s": ph, "graphs": graphs, "log": "x.log",
          "seconds": healthy + 5}
    if ok:
        st.update(healthy_s=healthy, first_request_s=0.2, tpot_ms={"1": 8.0, "8": 9.0, "64": 15.0})
    else:
        st["error"] = "RuntimeError: not healthy"
    return st


def fake_doc(device="NVIDIA H100 80GB HBM3", load_healthy=(40.1, 40.2, 40.3), load_graph=0.2):
    starts = {"eager": [fake_start("eager", i, h, None) for i, h in enumerate((40.0, 40.1, 39.9))],
              "capture": [fake_start("capture", i, h, 4.0) for i, h in enumerate((45.0, 45.5, 44.9))],
              "load": [fake_start("load", i, h, load_graph, restored=3, phase_extra=h - 40.0)
                       for i, h in enumerate(load_healthy)]}
    return {"name": "sglang_start", "date": "2026-12-08T10:00:00+00:00", "device": device, "commit": "abc1234def",
            "sglang": "0.5.17", "torch": "2.11.0", "runs": [{"date": "2026-12-08T10:00:00+00:00", "commit": "abc",
                                                           "argv": [], "stopped": None}],
            "models": {"qwen3-8b-36l": {"model": "qwen3-8b", "layers": 36, "max_bs": None, "kv_tokens": 65536,
                                        "save": [fake_start("save", 0, 80.0, 30.0)], "starts": starts}},
            "rows": []}


def rows_by_name(doc):
    return {name.split(": ", 1)[1]: (verdict, detail) for verdict, name, detail in doc["rows"]}


def test_verdict_rows_meet_the_targets():
    doc = fake_doc()
    bench.build_rows(doc)
    rows = rows_by_name(doc)
    assert rows["every start served"][0] == "PASS"
    assert rows["LOAD graph phase <= 0.3 s (median)"][0] == "PASS"
    verdict, detail = rows["LOAD healthy <= eager + 0.3 s (median)"]
    assert verdict == "PASS" and ": +0.20 s;" in detail and "imports +0.20 s" in detail
    assert rows["every LOAD restored every decode graph"][0] == "PASS"
    s = doc["models"]["qwen3-8b-36l"]["summary"]
    assert s["eager"]["healthy_s"] == {"median": 40.0, "min": 39.9, "max": 40.1, "n": 3}
    assert s["eager"]["phases_s"]["graphs"] is None and s["load"]["phases_s"]["graphs"] == 0.5
    assert s["load"]["tpot_ms"]["64"]["median"] == 15.0 and s["save"]["starts_ok"] == "1/1"


def test_verdict_rows_say_what_stands_between_load_and_eager():
    doc = fake_doc(load_healthy=(41.0, 41.2, 40.9), load_graph=1.5)
    doc["models"]["qwen3-8b-36l"]["starts"]["load"][0]["graphs"]["restored"] = 2
    doc["models"]["qwen3-8b-36l"]["starts"]["eager"].append(fake_start("eager", 3, 0, None, ok=False))
    bench.build_rows(doc)
    rows = rows_by_name(doc)
    assert rows["every start served"][0] == "FAIL" and "eager #3" in rows["every start served"][1]
    assert rows["LOAD graph phase <= 0.3 s (median)"][0] == "FAIL"
    verdict, detail = rows["LOAD healthy <= eager + 0.3 s (median)"]
    assert verdict == "FAIL" and ": +1.00 s;" in detail
    assert "imports +1.00 s" in detail and "attention+graphs+scheduler_rest +1.00 s" in detail
    assert rows["every LOAD restored every decode graph"][0] == "FAIL"


def test_missing_modes_skip_their_targets():
    doc = fake_doc()
    del doc["models"]["qwen3-8b-36l"]["starts"]["eager"]
    bench.build_rows(doc)
    assert rows_by_name(doc)["LOAD healthy <= eager + 0.3 s (median)"][0] == "SKIP"


def test_record_merge_name_and_plot(tmp_path):
    a, b = fake_doc(), fake_doc()
    b["date"], b["commit"] = "2026-12-08T11:00:00+00:00", "fff0000"
    merged = bench.merge_docs([a, b])
    entry = merged["models"]["qwen3-8b-36l"]
    assert len(merged["runs"]) == 2 and merged["commit"] == "fff0000"
    assert [len(entry["starts"][m]) for m in bench.MODES] == [6, 6, 6] and len(entry["save"]) == 2
    assert {st["run"] for st in entry["starts"]["load"]} == {0, 1}
    assert entry["summary"]["load"]["healthy_s"]["n"] == 6 and merged["rows"]
    assert len(a["models"]["qwen3-8b-36l"]["starts"]["load"]) == 3  # the inputs are left alone
    assert bench.record_name(merged) == "sglang_start-2026-12-08-h100.json"
    assert bench.device_slug("Some GPU 9000") == "some-gpu-9000"
    with pytest.raises(ValueError, match="different devices"):
        bench.merge_docs([a, fake_doc(device="NVIDIA H200")])
    pytest.importorskip("matplotlib")
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert bench.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path)]) == 0
    out = tmp_path / "sglang_start-2026-12-08-h100.json"
    assert json.loads(out.read_text())["models"]["qwen3-8b-36l"]["summary"]["eager"]["healthy_s"]["n"] == 6
    assert out.with_suffix(".png").stat().st_size > 0
    out.with_suffix(".png").unlink()
    assert bench.main(["--plot", str(out)]) == 0 and out.with_suffix(".png").exists()


def test_estimate_counts_what_runs():
    full = bench.estimate("dense", 36, bench.MODES, 5, 1, True)
    assert full["total_s"] > bench.estimate("dense", 36, bench.MODES, 2, 1, True)["total_s"]
    assert bench.estimate("dense", 36, bench.MODES, 5, 1, False)["save_s"] == 0
    assert set(bench.estimate("a3b", 48, ["load"], 1, 0, True)["per_start_s"]) == {"load"}


# -- one run against a stand-in server ---------------------------------------------------------------------------
FAKE_SERVER = r'''
import datetime, json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, mode = int(sys.argv[1]), sys.argv[2]
lines = json.loads(sys.argv[3])

def log(msg):
    d = datetime.datetime.now()
    print(f"[{d:%Y-%m-%d %H:%M:%S}.{d.microsecond // 1000:03d}] {msg}", flush=True)

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _json(self, doc):
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self._json({})
        elif self.path == "/server_info":
            self._json({"startup_time": {"load_weight": 0.01, "kv_cache_allocation": 0.01, "scheduler_e2e": 0.1,
                                         "cuda_graph": {"decode": 0.05}}})
        else:
            self.send_error(404)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = req["sampling_params"]["max_new_tokens"]
        if not req.get("stream"):
            return self._json({"output_ids": [7] * n, "meta_info": {"completion_tokens": n}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(1, n + 1):
            time.sleep(0.002)
            chunk = {"output_ids": [7], "meta_info": {"completion_tokens": i}}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

for msg in lines:
    if mode == "eager" and "Capture" in msg:
        continue
    if mode == "auto" and "Init torch distributed begin" in msg:
        time.sleep(0.3)  # what auto would cost in the scheduler's start
    if mode in ("load", "auto") and "Capture target decode CUDA graph end" in msg:
        log("foundry: restored 4 graphs in 0.01 s")
        log("foundry: first restored graph (decode_bs8) handed to the engine 0.020 s after restore() returned")
        log("foundry: until it asked, the engine was in (4 samples): 75% triton/jit.py:run < "
            "attention/triton_backend.py:_update_decode_kv_buffers; "
            "25% runner/decode_cuda_graph_runner.py:capture_prepare")
        log("foundry: mode=load recorded=0 restored=4 live=0")
    log(msg)
    time.sleep(0.01)
ThreadingHTTPServer.request_queue_size = 256  # 64 streams connect at once
server = ThreadingHTTPServer(("127.0.0.1", port), H)
log("The server is fired up and ready to roll!")
server.serve_forever()
'''


@pytest.fixture
def fake_sglang(tmp_path, monkeypatch):
    script = tmp_path / "fake_sglang.py"
    script.write_text(FAKE_SERVER)
    lines = json.dumps([m for _, m in LINES if "fired up" not in m])
    launched = []

    def start_server(name, model, out, gpu, mode, archive, extra=(), share=False, env=None):
        kind = "capture" if mode is None and "--disable-cuda-graph" not in extra else (mode or "eager")
        launched.append((kind, list(extra)) + ((env,) if env else ()))
        port = sglang_servers.free_port()
        return Server(name, [sys.executable, str(script), str(port), kind, lines], dict(os.environ),
                      out / f"{name}.log", port)

    monkeypatch.setattr(bench, "start_server", start_server)
    return launched


def run_args(tmp_path, **changes) -> Namespace:
    """The benchmark's arguments for a short run against the stand-in server (``changes`` override)."""
    a = dict(models="qwen3-8b", layers=2, starts=2, modes=list(bench.MODES), max_bs=8, tpot_starts=1, tpot_tokens=16,
             kv_tokens=4096, mem_fraction=0.5, start_timeout=60, budget=0, reuse_archive=False,
             workdir=str(tmp_path / "work"), out=str(tmp_path / "out"), logs=str(tmp_path / "logs"))
    return Namespace(**{**a, **changes})


def new_doc() -> dict:
    return {"name": "sglang_start", "date": "2026-12-08T10:00:00+00:00", "device": "NVIDIA H100 80GB HBM3",
            "commit": "abc", "sglang": "0.5.17", "torch": "2.11", "runs": [{"stopped": None}], "models": {},
            "rows": []}


def test_a_run_against_a_stand_in_server(tmp_path, fake_sglang):
    a = run_args(tmp_path)
    doc = new_doc()
    written = []
    bench.run_model("qwen3-8b", a, doc, 0, time.perf_counter(), lambda: written.append(bench.build_rows(doc)))
    entry = doc["models"]["qwen3-8b-2l-maxbs8"]
    assert [k for k, *_ in fake_sglang] == ["save"] + list(bench.MODES) * 2 and len(written) == 7
    assert all("--cuda-graph-max-bs-decode" in extra and "4096" in extra for _, extra, *_ in fake_sglang)
    assert (tmp_path / "work" / "models" / "qwen3-dense-2l" / "config.json").exists()
    for mode in bench.MODES:
        first, second = entry["starts"][mode]
        assert first["ok"] and second["ok"], first.get("error")
        assert set(first["tpot_ms"]) == {"1", "8", "64"} and all(v > 0 for v in first["tpot_ms"].values())
        assert "tpot_ms" not in second  # --tpot-starts 1
        assert first["first_request_s"] > 0 and first["sglang_startup_time"]["cuda_graph"] == {"decode": 0.05}
        ph = first["phases_s"]
        assert ph["tokenizer_manager"] is None and ph["imports"] > 0 and ph["health"] is not None
        assert (ph["graphs"] is None) == (mode == "eager")
        assert sum(v for v in ph.values() if v) == pytest.approx(first["healthy_s"], abs=0.05)
    load = entry["starts"]["load"][0]["graphs"]
    assert load["restored"] == 4 and load["live"] == 0 and load["bs"] == [1, 2, 4, 8]
    assert load["first_install_s"] == 0.02
    rows = rows_by_name(doc)
    assert rows["every start served"][0] == "PASS" and rows["every LOAD restored every decode graph"][0] == "PASS"
    assert "LOAD healthy <= eager + 0.3 s (median)" in rows
    graph_row = rows["LOAD graph phase <= 0.3 s (median)"][1]
    assert "preparation of the first graph 0.020 s" in graph_row
    assert "(SGLang was in: 75% triton/jit.py:run < " in graph_row
    after = {m: [bench.after_spawn(st) for st in entry["starts"][m]] for m in ("eager", "load")}
    assert all(v is not None and v > 0 for vs in after.values() for v in vs)
    state, detail = rows["LOAD - eager after the scheduler's imports"]
    excess = statistics.median(after["load"]) - statistics.median(after["eager"])
    assert state == "INFO" and f"({excess:+.2f} s)" in detail


def test_the_budget_stops_before_a_round_that_would_not_fit(tmp_path, fake_sglang):
    a = run_args(tmp_path, starts=3, modes=["eager"], max_bs=None, tpot_starts=0, tpot_tokens=4, budget=1e-3)
    doc = {"runs": [{"stopped": None}], "models": {}}
    bench.run_model("qwen3-8b", a, doc, 0, time.perf_counter(), lambda: None)
    assert [k for k, *_ in fake_sglang] == ["save"] and "before round 0" in doc["runs"][0]["stopped"]
    a.reuse_archive, a.budget = True, 0  # no archive was written by the stand-in: the save runs again
    bench.run_model("qwen3-8b", a, doc, 0, time.perf_counter(), lambda: None)
    assert [k for k, *_ in fake_sglang] == ["save", "save", "eager", "eager", "eager"]


def test_server_stop_ends_the_whole_process_group(tmp_path):
    """Children that ignore SIGTERM are killed after the grace time, and stop() returns once none runs."""
    log = tmp_path / "group.log"
    srv = Server("group", ["bash", "-c", "trap '' TERM; sleep 60 & echo $!; sleep 60"], dict(os.environ), log,
                 sglang_servers.free_port())
    for _ in range(100):
        if log.read_text().strip():
            break
        time.sleep(0.05)
    child = int(log.read_text().split()[0])
    assert sglang_servers._group_alive(srv.proc.pid)
    srv.stop(grace=1)
    assert srv.proc.poll() is not None and not sglang_servers._group_alive(srv.proc.pid)
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_auto_mode_on_the_same_archive_is_a_mode_of_its_own(tmp_path, fake_sglang):
    """``--modes ...,load_auto`` starts the launcher with ``--foundry-mode auto`` on the saved archive and reports
    what it costs against ``load``, phase by phase."""
    a = run_args(tmp_path, starts=1, modes=["load", "load_auto"], tpot_starts=0)
    doc = new_doc()
    bench.run_model("qwen3-8b", a, doc, 0, time.perf_counter(), lambda: bench.build_rows(doc))
    assert [k for k, *_ in fake_sglang] == ["save", "load", "auto"]
    rows = rows_by_name(doc)
    status, detail = rows["--foundry-mode auto vs load on the same archive"]
    assert status == "INFO" and "scheduler_spawn +0.3" in detail
    assert rows["every LOAD restored every decode graph"] == ("PASS", "2 starts, 4 graphs each, none live")
    assert "load_auto" in bench.tables(doc)
    assert bench.main(["--estimate", "--models", "qwen3-8b", "--modes", "load,load_auto", "--starts", "1"]) == 0


def test_load_late_is_a_load_without_the_early_triton_key(tmp_path, fake_sglang):
    """``--modes load,load_late``: the same LOAD with ``FOUNDRY_EARLY_LOAD=0`` (Triton's cache key computed at the
    first launch, in the graph phase), and a row comparing their graph phases."""
    a = run_args(tmp_path, starts=1, modes=["load", "load_late"], tpot_starts=0)
    doc = new_doc()
    bench.run_model("qwen3-8b", a, doc, 0, time.perf_counter(), lambda: bench.build_rows(doc))
    assert fake_sglang[1][0] == "load" and len(fake_sglang[1]) == 2
    assert fake_sglang[2][0] == "load" and fake_sglang[2][2] == {"FOUNDRY_EARLY_LOAD": "0"}
    status, detail = rows_by_name(doc)["Triton's cache key on a thread (load) vs at the first launch (load_late)"]
    assert status == "INFO" and detail.startswith("graph phase median ")

