"""GPU check: SGLang 0.5.23's real FullCudaGraphBackend, patched by our plugin, SAVE then LOAD in fresh processes.

Run (one command, on the GPU machine, with the pure-Python sglang wheel and its light deps on PYTHONPATH):

    PYTHONPATH=$PWD:$PYTHONPATH python3 tests/gpu/check_sglang_backend.py --out $OUT/sglang_backend

Steps, each in its own process: (1) import sglang's full_cuda_graph_backend under this torch; (2) SAVE: the
built-in engine's ModelRunner (decode forward, builtin:tiny) drives FullCudaGraphBackend.capture_session /
capture_one / replay through the plugin's hooks with a real foundry_core.Session, then writes the archive;
(3) LOAD: same in a fresh process, graphs restored (forward never run); replays must equal SAVE's bitwise.
A verdict table is printed last; details are in OUT/*.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback

SIZES = [1, 2, 4, 8, 16]

#: GPU-only wheels SGLang imports at module level but that cannot be carried to the lent machine
#: (sglang-kernel is 373 MB; the transfer limit is 64 MiB). With --stub-gpu-wheels they are replaced by
#: import-only stubs: any attribute use raises. FullCudaGraphBackend's capture/replay path calls none of them.
STUBBABLE = ("sgl_kernel", "flashinfer", "flash_attn", "deep_gemm", "deep_ep", "xgrammar", "torch_memory_saver",
             "triton_kernels", "vllm")
STUBBED: list[str] = []


def install_import_stubs() -> None:
    import importlib.abc
    import importlib.machinery
    import types
    import typing

    class _StubModule(types.ModuleType):
        # Every attribute is typing.Any: usable in annotations (pydantic models), as a base class and in
        # isinstance-free code paths, but calling it raises TypeError ("Cannot instantiate typing.Any").
        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return typing.Any

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in STUBBABLE:
                try:  # a real installation wins
                    if importlib.machinery.PathFinder.find_spec(name, path) is not None:
                        return None
                except (ImportError, ValueError):
                    pass
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            STUBBED.append(spec.name)
            module = _StubModule(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.append(_Finder())


def step_import(out: str) -> dict:
    t0 = time.perf_counter()
    try:
        import importlib

        import torch

        for name in ("sglang.srt.model_executor.runner_backend.full_cuda_graph_backend",
                     "sglang.srt.model_executor.runner.shape_key", "sglang.srt.plugins.hook_registry",
                     "foundry_sglang.plugin.hooks"):  # the last imports the classes the plugin patches
            importlib.import_module(name)
        stubs = f"; import-only stubs: {sorted(set(n.split('.')[0] for n in STUBBED))}" if STUBBED else ""
        return {"ok": True, "torch": torch.__version__ + stubs, "seconds": time.perf_counter() - t0}
    except BaseException as err:
        return {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-4000:]}


class SglangBackendAdapter:
    """The engine's graph-backend interface on top of a real (plugin-patched) FullCudaGraphBackend."""

    def __init__(self, router):
        import torch
        from sglang.srt.model_executor.runner_backend.full_cuda_graph_backend import FullCudaGraphBackend
        from sglang.srt.model_executor.runner_utils.pool import GraphPoolPrecarve

        class _Runner:  # DecodeCudaGraphRunner stand-in: the backend reads only these attributes
            enable_profile_cuda_graph = False
            device_module = torch.cuda

        class _NoTpGroup:
            def barrier(self):
                pass

        # FullCudaGraphBackend.__init__ reads SGLang's runtime context (tp group, memory saver); set the same
        # fields it sets, so that every method we call is SGLang's own.
        b = object.__new__(FullCudaGraphBackend)
        b._graphs, b._outputs, b._pool, b._capture_stream = {}, {}, None, None
        b._cuda_graph_runner, b._device_module, b._tp_group = _Runner(), torch.cuda, _NoTpGroup()
        b._precarve, b._reuse_output_buffer, b._output_buffer = GraphPoolPrecarve(), False, None
        b._memory_saver_adapter = None
        self.backend, self.router = b, router

    def before_allocations(self):
        self.router.open()

    @staticmethod
    def key(bs):
        from sglang.srt.model_executor.runner.shape_key import ShapeKey

        return ShapeKey(size=bs)

    def capture_session(self, stream):
        return self.backend.capture_session(stream)

    def capture_one(self, bs, fn):
        return self.backend.capture_one(self.key(bs), fn)

    def can_run(self, bs):
        return self.backend.can_run(None, self.key(bs))

    def replay(self, bs):
        return self.backend.replay(self.key(bs), None)

    def cleanup(self):
        self.backend.cleanup()


def step_run(phase: str, out: str) -> dict:
    import torch

    os.environ["FOUNDRY_MODE"] = phase
    os.environ["FOUNDRY_ARCHIVE"] = out
    from sglang.srt.model_executor.runner_backend.full_cuda_graph_backend import FullCudaGraphBackend
    from sglang.srt.plugins.hook_registry import HookRegistry

    import foundry_core
    from foundry_sglang import plugin
    from foundry_sglang.engine.config import EngineArgs
    from foundry_sglang.engine.model_runner import ModelRunner
    from foundry_sglang.graphs import GraphRouter
    from foundry_sglang.plugin import hooks

    plugin.register()
    HookRegistry.apply_hooks()
    patched = FullCudaGraphBackend.__dict__["capture_one"] is not hooks._original(FullCudaGraphBackend, "capture_one")
    hooks.register_output_pytrees()
    path = os.path.join(out, "engine-tiny.foundry")
    session = foundry_core.Session(path, mode=phase, key="check_sglang_backend", device=0)
    live = hooks._original(FullCudaGraphBackend, "capture_one")
    router = GraphRouter(session, phase)
    capture = hooks.CaptureAdapter(router, live_capture=lambda b, *a: live(b, *a),
                                   capture_scope=hooks._graph_pool_capture_scope())
    hooks._state = hooks.PluginState(session=session, router=router, capture=capture, archive_path=path,
                                     key_material="{}", kv_config={"num_kv_pages": 64})
    adapter = SglangBackendAdapter(router)
    t0 = time.perf_counter()
    args = EngineArgs(model="builtin:tiny", device="cuda", num_kv_pages=64, cuda_graph_bs=SIZES, max_num_seqs=16)
    runner = ModelRunner(args, rank=0, graph_backend=adapter)
    startup = time.perf_counter() - t0
    if phase == "save":
        hooks.after_init_cuda_graphs(None, runner)
    # deterministic inputs in the static buffers, then SGLang's own replay() per size
    g = torch.Generator().manual_seed(0)
    digests, bitwise_repeat = {}, True
    with torch.inference_mode():
        runner.s_input_ids.copy_(torch.randint(0, 100, runner.s_input_ids.shape, generator=g))
        runner.s_positions.copy_(torch.arange(runner.s_positions.numel()) % 7)
        runner.s_seq_lens.fill_(5)
        runner.s_slot_mapping.copy_(torch.arange(runner.s_slot_mapping.numel()))
        for bs in SIZES:
            a = adapter.replay(bs)
            a = (a.next_token_logits if hasattr(a, "next_token_logits") else a).float().cpu().clone()
            b = adapter.replay(bs)
            b = (b.next_token_logits if hasattr(b, "next_token_logits") else b).float().cpu().clone()
            bitwise_repeat &= torch.equal(a, b)
            digests[str(bs)] = hashlib.sha256(a.numpy().tobytes()).hexdigest()
    return {"ok": True, "phase": phase, "mode": session.mode, "hooks_patched": patched, "router": router.summary(),
            "startup_s": startup, "digests": digests, "repeat_bitwise": bitwise_repeat}


def run_child(phase: str, out: str) -> dict:
    res_path = os.path.join(out, f"{phase}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--out", out] + (
        ["--stub-gpu-wheels"] if "--stub-gpu-wheels" in sys.argv else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    with open(os.path.join(out, f"{phase}.log"), "w") as f:
        f.write(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if os.path.exists(res_path):
        return json.load(open(res_path))
    return {"ok": False, "error": f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the archive, logs and JSON results")
    ap.add_argument("--phase", choices=("import", "save", "load"), help="internal: run one step in this process")
    ap.add_argument("--stub-gpu-wheels", action="store_true",
                    help=f"replace missing GPU-only wheels ({', '.join(STUBBABLE)}) by import-only stubs")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.stub_gpu_wheels:
        install_import_stubs()
    if a.phase:
        try:
            res = step_import(a.out) if a.phase == "import" else step_run(a.phase, a.out)
        except BaseException as err:
            res = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-4000:]}
        json.dump(res, open(os.path.join(a.out, f"{a.phase}.json"), "w"), indent=1)
        return 0 if res.get("ok") else 1
    rows = []
    imp = run_child("import", a.out)
    rows.append(("import sglang full_cuda_graph_backend", imp.get("ok"), imp.get("torch") or imp.get("error", "")))
    if imp.get("ok"):
        save = run_child("save", a.out)
        rows.append(("SAVE via patched FullCudaGraphBackend", save.get("ok") and save.get("mode") == "save",
                     save.get("router") or save.get("error", "")))
        load = run_child("load", a.out) if save.get("ok") else {"ok": False, "error": "skipped (SAVE failed)"}
        rows.append(("LOAD in a fresh process", load.get("ok") and load.get("mode") == "load"
                     and "restored=" in load.get("router", "") and "live=0" in load.get("router", ""),
                     load.get("router") or load.get("error", "")))
        same = bool(save.get("digests")) and save.get("digests") == load.get("digests")
        rows.append(("restored replays == saved replays (bitwise)", same,
                     f"{len(save.get('digests', {}))} sizes; save startup {save.get('startup_s', 0):.2f}s, "
                     f"load startup {load.get('startup_s', 0):.2f}s"))
        repeat_ok = save.get("repeat_bitwise") and load.get("repeat_bitwise")
        rows.append(("repeat replays bitwise (save/load)", repeat_ok, ""))
    print("\n| check | verdict | detail |\n|---|---|---|")
    for name, ok, detail in rows:
        print(f"| {name} | {'PASS' if ok else 'FAIL'} | {str(detail)[:160]} |")
    return 0 if all(r[1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
