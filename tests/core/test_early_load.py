"""CPU tests of ``foundry_core.preload``: what Session.open() adopts, what it leaves, and that the errors an early
load finds are the ones open() reports itself. No CUDA is faked: on a machine without a GPU an early load of a
valid archive stops at the device query, exactly where open() stops."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import foundry_core as fc
from foundry_core import early, schema
from foundry_core.archive import Archive
from foundry_core.errors import ArchiveError, DeviceUnavailable, FoundryError, UntrustedArchive
from foundry_core.options import Options

REPO = Path(__file__).resolve().parents[2]
KEY = "qwen3-8b|tp1|rank0|kv_pages=4096"  # the sample archive's key (tests/conftest.py)

try:
    import ctypes

    ctypes.CDLL("libcuda.so.1")
    HAS_DRIVER = True
except OSError:
    HAS_DRIVER = False
needs_no_gpu = pytest.mark.skipif(HAS_DRIVER, reason="an early load of a valid archive stops at the device query "
                                                     "only without a CUDA driver")


@pytest.fixture(autouse=True)
def no_early_loads_left():
    yield
    for e in early.started():
        e.discard()


@pytest.fixture
def opens(monkeypatch):
    """Counts Archive.open calls made from now on (the real method runs)."""
    calls = []
    real = Archive.open.__func__

    def counting(cls, path, *args):
        calls.append(Path(path))
        return real(cls, path, *args)

    monkeypatch.setattr(Archive, "open", classmethod(counting))
    return calls


def corrupt(tmp_path: Path, name: str = "bad.foundry") -> Path:
    path = tmp_path / name
    path.write_bytes(b"this is not an archive" * 10)
    return path


def open_error(path: Path, mode: str = "load", **kwargs) -> FoundryError:
    with pytest.raises(FoundryError) as err:
        fc.Session(path, mode=mode, **kwargs).open()
    return err.value


def test_an_adopted_early_load_reports_the_same_error_without_opening_the_archive_again(tmp_path, opens):
    path = corrupt(tmp_path)
    expected = open_error(path)
    opens.clear()
    e = fc.preload(path, key="k").wait()
    opens.clear()
    got = open_error(path, key="k")
    assert type(got) is type(expected) is ArchiveError and str(got) == str(expected)
    assert e.adopted and opens == []  # open() took the thread's result
    assert early.started() == []


@needs_no_gpu
def test_a_valid_archive_stops_at_the_device_as_open_does(archive_file, opens):
    path, _ = archive_file
    expected = open_error(path, key=KEY)
    e = fc.preload(path, key=KEY).wait()
    opens.clear()
    got = open_error(path, key=KEY)
    assert isinstance(got, DeviceUnavailable) and str(got) == str(expected)
    assert e.adopted and opens == []
    assert e.preloader is None and e.archive is None  # nothing was loaded after the failed check


def test_an_untrusted_archive_is_refused_with_the_same_line(archive_file, opens):
    path, _ = archive_file
    os.chmod(path, 0o666)
    expected = open_error(path, key=KEY)
    fc.preload(path, key=KEY).wait()
    opens.clear()
    got = open_error(path, key=KEY)
    assert isinstance(got, UntrustedArchive) and str(got) == str(expected) and opens == []


@needs_no_gpu  # with a GPU, the fallback SAVE would open
def test_auto_falls_back_for_the_same_reason(tmp_path):
    path = corrupt(tmp_path, "model.foundry")
    plain = fc.Session(path, mode="auto")
    with pytest.raises(FoundryError):
        plain.open()  # falls back to SAVE, which needs a GPU here (or succeeds on one)
    fc.preload(path, key="").wait()
    adopted = fc.Session(path, mode="auto")
    with pytest.raises(FoundryError):
        adopted.open()
    assert adopted.open_stats.get("early_load") == 1.0
    assert adopted.fallback_reason == plain.fallback_reason and "model.foundry" in adopted.fallback_reason
    assert path.read_bytes() == b"this is not an archive" * 10


@pytest.mark.parametrize("other", [dict(key="other key"), dict(device=1), dict(rank=0),
                                   dict(options=Options(inflate_budget=1 << 30))])  # its checks are not the session's
def test_an_early_load_for_other_arguments_is_not_adopted(tmp_path, opens, other):
    path = corrupt(tmp_path)
    e = fc.preload(path, key="k").wait()
    opens.clear()
    open_error(path, **{"key": "k", **other})
    assert not e.adopted and opens == [path]  # open() did the work itself
    assert early.started() == [e]  # left for a session that matches


def test_the_same_file_under_another_spelling_is_adopted(tmp_path, opens):
    path = corrupt(tmp_path)
    (tmp_path / "sub").mkdir()
    e = fc.preload(tmp_path / "sub" / ".." / path.name, key="k").wait()
    opens.clear()
    open_error(path, key="k")
    assert e.adopted and opens == []


def test_a_file_replaced_since_the_early_load_is_opened_again(tmp_path, opens):
    path = corrupt(tmp_path)
    e = fc.preload(path, key="k").wait()
    replacement = tmp_path / "new"
    replacement.write_bytes(b"another broken archive, longer than the header" * 4)
    os.replace(replacement, path)
    opens.clear()
    err = open_error(path, key="k")
    assert not e.adopted and opens == [path]
    assert str(err) == str(open_error(path, key="k"))
    assert early.started() == []  # discarded: nobody else could use it


def test_a_file_edited_in_place_since_the_early_load_is_opened_again(tmp_path, opens):
    """Same inode, same size, mtime put back: only the ctime tells (it cannot be set back)."""
    path = corrupt(tmp_path)
    e = fc.preload(path, key="k").wait()
    before = os.stat(path)
    time.sleep(0.02)  # past the filesystem's timestamp granularity
    with open(path, "r+b") as f:
        f.write(b"THIS")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    opens.clear()
    open_error(path, key="k")
    assert not e.adopted and opens == [path]
    assert early.started() == []


def test_a_failed_early_load_leaves_open_to_do_the_work(tmp_path, opens, monkeypatch):
    from foundry_core import fingerprint

    monkeypatch.setattr(fingerprint, "installed_torch_versions", lambda: None)  # torch's files unreadable
    path = corrupt(tmp_path)
    e = fc.preload(path, key="k").wait()
    assert e.failure is not None and e.problem is None
    opens.clear()
    assert isinstance(open_error(path, key="k"), ArchiveError)
    assert not e.adopted and opens == [path]


def test_an_early_load_made_with_other_torch_versions_is_not_adopted(tmp_path):
    path = corrupt(tmp_path)
    e = fc.preload(path, key="k").wait()
    e.fingerprint = schema.Fingerprint(gpu_name="g", compute_capability="9.0", driver_version=13000,
                                       cuda_runtime="13.0", torch="2.11.0+cu130", triton="", foundry="", key="k")
    assert early.claim(path, "k", 0, None, ("2.11.0+cu130", "13.0"), e.options) is e
    e.adopted = False
    early._started.append(e)
    assert early.claim(path, "k", 0, None, ("2.14.1+cu130", "13.0"), e.options) is None
    assert "torch 2.11.0+cu130" in e.unusable_reason(("2.14.1+cu130", "13.0"))


def test_discard_forgets_an_unused_load_and_spares_an_adopted_one(tmp_path):
    path = corrupt(tmp_path)
    unused = fc.preload(path, key="a")
    unused.discard()
    assert unused.finished and early.started() == []
    adopted = fc.preload(path, key="b").wait()
    open_error(path, key="b")
    adopted.discard()
    assert adopted.adopted


def test_torch_version_is_read_without_importing_torch():
    code = ("import sys; from foundry_core.fingerprint import installed_torch_versions as v; got = v(); "
            "assert 'torch' not in sys.modules; import torch; "
            "assert got == (str(torch.__version__), torch.version.cuda or ''), got; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_the_early_thread_never_imports_torch(tmp_path):
    """The thread's archive checks and table decoding run beside `import torch` without taking its lock."""
    code = f"""
import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
from pathlib import Path
from conftest import sample_archive
import foundry_core
from foundry_core.archive import Archive
from foundry_core.restore import check_tables_for_load
good = Path({str(tmp_path / 'good.foundry')!r}); sample_archive(good)
bad = Path({str(tmp_path / 'bad.foundry')!r}); bad.write_bytes(b'x' * 200)
loads = [foundry_core.preload(p, key='k').wait() for p in (good, bad)]
assert all(e.finished and e.failure is None for e in loads), [e.failure for e in loads]
with Archive.open(good) as a:
    assert len(check_tables_for_load(a)) == 3
assert 'torch' not in sys.modules
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
