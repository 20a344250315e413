"""CPU tests of Session's mode resolution and its errors up to the GPU boundary (no CUDA is faked)."""
import pytest

import foundry_core as fc
from foundry_core.errors import ArchiveError, DeviceUnavailable, FoundryError

try:
    import ctypes

    ctypes.CDLL("libcuda.so.1")
    HAS_DRIVER = True
except OSError:
    HAS_DRIVER = False
needs_no_gpu = pytest.mark.skipif(HAS_DRIVER, reason="checks the no-GPU messages; this machine has a CUDA driver")


def test_bad_mode_is_refused():
    with pytest.raises(FoundryError, match="mode must be save, load, auto, not 'restore'"):
        fc.Session("x.foundry", mode="restore")


def test_modes_are_one_enum_that_engine_settings_reuse():
    from foundry_core.session import SessionMode
    from foundry_sglang.graphs.settings import FoundryMode

    assert fc.Session("x.foundry", mode="load").requested_mode is SessionMode.LOAD
    assert fc.Session("x.foundry").requested_mode is SessionMode.AUTO
    assert fc.Session("x.foundry", mode=FoundryMode.SAVE.session_mode).requested_mode is SessionMode.SAVE
    assert {m.value for m in FoundryMode} == {m.value for m in SessionMode} | {"off"}
    assert all(FoundryMode(m.value).session_mode is m for m in SessionMode)
    with pytest.raises(ValueError, match="off has no session"):
        FoundryMode.OFF.session_mode
    assert f"{SessionMode.LOAD}" == str(SessionMode.LOAD) == "load"


def test_calls_before_open_are_refused(tmp_path):
    s = fc.Session(tmp_path / "a.foundry", mode="save")
    with pytest.raises(FoundryError, match="open"):
        with s.capture_phase():
            pass
    with pytest.raises(FoundryError, match="open"):
        s.restore()


def test_load_without_archive_is_a_clear_error(tmp_path):
    with pytest.raises(ArchiveError, match="no archive"):
        fc.Session(tmp_path / "missing.foundry", mode="load").open()


def test_load_of_corrupt_archive_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.foundry"
    path.write_bytes(b"this is not an archive" * 10)
    with pytest.raises(ArchiveError, match="bad.foundry"):
        fc.Session(path, mode="load").open()


@needs_no_gpu
def test_load_of_valid_archive_without_gpu_says_so(archive_file):
    path, _ = archive_file
    s = fc.Session(path, mode="load")
    with pytest.raises(DeviceUnavailable, match="no usable CUDA device"):
        s.open()
    assert s.mode is None  # a failed open arms nothing and can be retried


@needs_no_gpu
def test_save_without_gpu_says_so(tmp_path):
    """Before: `cuptiSubscribe failed: CUPTI_ERROR_UNKNOWN (999)` (the image recorder starts first)."""
    s = fc.Session(tmp_path / "model.foundry", mode="save")
    with pytest.raises(DeviceUnavailable) as err:
        s.open()
    assert str(err.value).startswith("no usable CUDA device: ") and "CUPTI" not in str(err.value)
    assert "\n" not in str(err.value) and s.mode is None


@needs_no_gpu
@pytest.mark.parametrize("content", [None, b"garbage" * 20])
def test_auto_falls_back_to_save_and_then_needs_a_gpu(tmp_path, content):
    path = tmp_path / "model.foundry"
    if content is not None:
        path.write_bytes(content)
    s = fc.Session(path, mode="auto")
    with pytest.raises(FoundryError) as err:  # a one-line FoundryError, never a raw torch/driver exception
        s.open()
    assert "\n" not in str(err.value)
    assert s.fallback_reason and ("no archive" in s.fallback_reason or "model.foundry" in s.fallback_reason)
    if content is not None:
        assert path.read_bytes() == content  # nothing a user had is touched by a failed start


def test_keep_previous_moves_an_archive_aside(tmp_path):
    from foundry_core.session import keep_previous

    path = tmp_path / "m.foundry"
    path.write_bytes(b"old archive")
    prev = keep_previous(path)
    assert prev.name == "m.foundry.prev" and prev.read_bytes() == b"old archive" and not path.exists()
    path.write_bytes(b"newer")
    keep_previous(path)
    assert prev.read_bytes() == b"newer"
