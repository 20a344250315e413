"""The standby's forkserver imports SGLang's modules without starting CUDA; the GPU's name and compute capability,
which those modules ask for at import, are answered with the node's one GPU kind (read from NVML on a GPU node)."""
import ctypes.util
import importlib
import sys
import textwrap

import pytest

from foundry_sglang.plugin import forkserver, gpu_facts

torch = pytest.importorskip("torch")

H100 = ("NVIDIA H100 80GB HBM3", (9, 0))


@pytest.fixture
def asks_at_import(tmp_path, monkeypatch):
    """A module that asks for the GPU at import, as SGLang's communicator (is_sm90_supported) does."""
    (tmp_path / "asks_gpu_at_import.py").write_text(textwrap.dedent("""
        import torch
        from torch.cuda import get_device_capability as bound_capability

        CAPABILITY = torch.cuda.get_device_capability()
        NAME = torch.cuda.get_device_name(0)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "asks_gpu_at_import"
    sys.modules.pop("asks_gpu_at_import", None)


def test_imports_are_told_the_nodes_gpu_kind_and_torch_is_itself_again_afterwards(asks_at_import):
    before = (torch.cuda._lazy_init, torch.cuda.get_device_name, torch.cuda.get_device_capability)
    restore = forkserver._answer_gpu_queries(torch, H100)
    try:
        module = importlib.import_module(asks_at_import)
        assert (module.NAME, module.CAPABILITY) == H100
        with pytest.raises(forkserver.CudaAtImport):      # anything more of CUDA is still refused
            torch.cuda._lazy_init()
    finally:
        restore()
    assert (torch.cuda._lazy_init, torch.cuda.get_device_name, torch.cuda.get_device_capability) == before
    if not torch.cuda.is_available():
        # a name bound during the preload asks torch again afterwards: here, with no GPU, torch says so
        with pytest.raises(Exception) as raised:
            module.bound_capability()
        assert not isinstance(raised.value, forkserver.CudaAtImport)


def test_without_a_known_gpu_kind_a_module_that_asks_is_not_preloaded(asks_at_import):
    restore = forkserver._answer_gpu_queries(torch, None)
    try:
        with pytest.raises(forkserver.CudaAtImport, match="initialises CUDA at import"):
            importlib.import_module(asks_at_import)
    finally:
        restore()


def test_no_nvml_means_no_answers():
    assert gpu_facts.node_gpu("libno-such-nvml.so.1") is None
    assert gpu_facts.node_gpu(ctypes.util.find_library("c")) is None     # a library without NVML's functions
    if ctypes.util.find_library("nvidia-ml") is None:     # a machine without the NVIDIA driver, like CI's
        assert gpu_facts.node_gpu() is None


def test_mig_devices_get_no_answers(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-5f1c7a2e-0d1b-4c7e-9a51-2f0e8c1d7b3a")
    assert gpu_facts.node_gpu() is None
