"""CPU stand-ins for the GPU objects the SGLang plugin drives (tests only; nothing here touches CUDA).

``CpuStandInGraph`` mimics the replay-side API of ``torch.cuda.CUDAGraph``/``foundry_core.RestoredGraph``;
``CpuStandInSession`` mimics ``foundry_core.Session`` (open/mode/new_graph/add_graph/capture_phase/save/restore)
and writes a small JSON file instead of a real archive, so SAVE and LOAD routing can be tested end to end.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch


class SlotLog:
    """Stands in for a SAVE session's ``slot()``: records what ``Session.slot`` would be told (no kernel is
    launched on CPU)."""

    def __init__(self):
        self.calls = []

    def slot(self, op, **fields):
        self.calls.append(dict(fields, op=op))
        return len(self.calls)


class CpuStandInGraph:
    """Stands in for a captured CUDA graph: replay() recomputes the captured output on CPU."""

    def __init__(self):
        self.replays = 0
        self.fn = None
        self.outputs = None

    def replay(self):
        self.replays += 1
        if self.fn is not None:
            self.fn()

    def reset(self):
        self.fn = None


class CpuStandInDevice:
    """Stands in for torch.cuda as FullCudaGraphBackend._device_module."""

    def __init__(self):
        self.syncs = 0
        self.captures = []

    def synchronize(self):
        self.syncs += 1

    @contextlib.contextmanager
    def graph(self, cuda_graph, pool=None, stream=None):
        self.captures.append((cuda_graph, pool, stream))
        yield


class CpuStandInSession:
    """Stands in for foundry_core.Session: 'archive' = JSON of output values per graph name."""

    instances: list = []

    def __init__(self, path, mode="auto", key="", device=0, rank=None):
        self.path, self.requested, self.key, self.device, self.rank = str(path), mode, key, device, rank
        self.mode = None
        self.graph_pool = ("stand-in-pool", 1)
        self.added = {}
        self.extra = {}
        self.capture_phases = 0
        self.fail_restore = None
        self.closed = False
        CpuStandInSession.instances.append(self)

    def open(self):
        self.requested = getattr(self.requested, "value", self.requested)
        if self.requested == "auto":
            self.mode = "load" if os.path.exists(self.path) else "save"
        else:
            self.mode = self.requested
        if self.mode == "load":
            with open(self.path) as f:
                data = json.load(f)
            if data["key"] != self.key:
                from foundry_core.errors import IncompatibleArchive

                raise IncompatibleArchive("key differs")
            self.extra = data["extra"]
        return self

    def close(self):
        self.closed = True

    def new_graph(self):
        return CpuStandInGraph()

    @contextlib.contextmanager
    def capture_phase(self):
        self.capture_phases += 1
        yield

    def add_graph(self, key, graph, outputs, capture_seconds=0.0):
        self.added[key] = outputs

    def save(self, extra=None):
        data = {"key": self.key, "extra": dict(extra or {}),
                "graphs": {k: v.tolist() for k, v in self.added.items()}}
        with open(self.path, "w") as f:
            json.dump(data, f)
        return self.path

    def restore(self, order=None):
        if self.fail_restore:
            raise RuntimeError(self.fail_restore)
        with open(self.path) as f:
            data = json.load(f)
        out = {}
        for name, values in data["graphs"].items():
            g = CpuStandInGraph()
            g.outputs = torch.zeros(len(values))
            saved = torch.tensor(values, dtype=torch.float32)
            g.fn = lambda g=g, saved=saved: g.outputs.copy_(saved)
            out[name] = g
        return out
