"""LOAD runs an archive's GPU code, so it refuses archives other users could have written, unless they carry a
valid HMAC made with the deployment's key (CPU)."""
from __future__ import annotations

import os

import pytest

import foundry_core as fc
from foundry_core import cli
from foundry_core.errors import ArchiveError, DeviceUnavailable, FoundryError, UntrustedArchive

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
KEY = "a deployment secret of enough length"


def _load_problem(path) -> FoundryError:
    """What LOAD says about ``path`` on this machine; trust is checked before the GPU is looked for."""
    with pytest.raises(FoundryError) as err:
        fc.Session(path, mode="load").open()
    assert "\n" not in str(err.value)
    return err.value


def test_private_archive_passes_trust(archive_file):
    path, _ = archive_file
    assert isinstance(_load_problem(path), DeviceUnavailable)  # the next check, on this GPU-less machine


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_archive_writable_by_other_users_is_refused(archive_file, mode):
    path, _ = archive_file
    path.chmod(mode)
    problem = _load_problem(path)
    assert isinstance(problem, UntrustedArchive) and isinstance(problem, ArchiveError)
    assert "writable by other users" in str(problem) and "FOUNDRY_ARCHIVE_KEY" in str(problem)


def test_auto_mode_saves_afresh_instead_of_loading_an_untrusted_archive(archive_file):
    path, _ = archive_file
    path.chmod(0o666)
    s = fc.Session(path, mode="auto", record_images=False)  # no CUPTI: it would stay loaded for later tests
    with pytest.raises(FoundryError):
        s.open()  # SAVE needs a GPU here; what matters is that it did not try to LOAD
    assert "writable by other users" in (s.fallback_reason or "")


@needs_root
def test_archive_owned_by_another_user_is_refused(archive_file):
    path, _ = archive_file
    os.chown(path, 12345, 12345)
    assert "belongs to uid 12345" in str(_load_problem(path))


def _signed(tmp_path, monkeypatch):
    from conftest import sample_archive

    monkeypatch.setenv("FOUNDRY_ARCHIVE_KEY", KEY)
    path = tmp_path / "shared.foundry"
    sample_archive(path)  # ArchiveWriter signs when a key is configured
    return path


@needs_root
def test_signed_archive_loads_from_a_shared_directory(tmp_path, monkeypatch):
    path = _signed(tmp_path, monkeypatch)
    assert path.with_name(path.name + ".hmac").exists()
    os.chown(path, 12345, 12345)  # written by another service account of the deployment
    assert isinstance(_load_problem(path), DeviceUnavailable)


def test_signature_is_required_once_a_key_is_configured(tmp_path, monkeypatch):
    path = _signed(tmp_path, monkeypatch)
    assert isinstance(_load_problem(path), DeviceUnavailable)
    path.with_name(path.name + ".hmac").unlink()
    problem = _load_problem(path)
    assert isinstance(problem, UntrustedArchive) and "not signed" in str(problem)


def test_wrong_key_or_changed_archive_is_refused(tmp_path, monkeypatch):
    from conftest import rewrite_manifest

    path = _signed(tmp_path, monkeypatch)
    monkeypatch.setenv("FOUNDRY_ARCHIVE_KEY", KEY + "!")
    assert "signature does not match" in str(_load_problem(path))
    monkeypatch.setenv("FOUNDRY_ARCHIVE_KEY", KEY)
    import msgspec

    from foundry_core.archive import Archive

    with Archive.open(path) as archive:
        doc = msgspec.to_builtins(archive.manifest)
    doc["extra"]["kv_pages"] = "1"  # a consistent archive (header fixed), but not the one that was signed
    rewrite_manifest(path, doc)
    assert "signature does not match" in str(_load_problem(path))


def test_key_file(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("FOUNDRY_ARCHIVE_KEY_FILE", str(key_file))
    from conftest import sample_archive

    path = tmp_path / "a.foundry"
    sample_archive(path)
    assert isinstance(_load_problem(path), DeviceUnavailable)
    key_file.chmod(0o666)
    assert "writable by other users" in str(_load_problem(path))


def test_cli_sign_then_verify(archive_file, monkeypatch, capsys):
    path, _ = archive_file
    monkeypatch.setenv("FOUNDRY_ARCHIVE_KEY", KEY)
    assert cli.main(["verify", str(path), "--no-machine-check"]) == cli.EXIT_BAD
    assert "not signed" in capsys.readouterr().err
    assert cli.main(["sign", str(path)]) == cli.EXIT_OK
    assert cli.main(["verify", str(path), "--no-machine-check"]) == cli.EXIT_OK
    assert "signed with the configured key" in capsys.readouterr().out


def test_cli_verify_reports_an_archive_others_can_write(archive_file, capsys):
    path, _ = archive_file
    path.chmod(0o666)
    assert cli.main(["verify", str(path), "--no-machine-check"]) == cli.EXIT_BAD
    assert "writable by other users" in capsys.readouterr().err


# -- commands that write or sign trust their input as LOAD would -----------------------------------------------------


def _untrusted(path, how, monkeypatch):
    if how == "writable by others":
        path.chmod(0o666)
    elif how == "another owner":
        os.chown(path, 12345, 12345)
    else:  # "unsigned": written before the deployment had a key
        monkeypatch.setenv("FOUNDRY_ARCHIVE_KEY", KEY)


UNTRUSTED = ["writable by others", "unsigned", pytest.param("another owner", marks=needs_root)]


@pytest.mark.parametrize("how", UNTRUSTED)
def test_pack_does_not_launder_an_archive_load_refuses(archive_file, monkeypatch, capsys, how):
    """Before: pack copied an archive that verify refused into a private file (signed, with a key set), which
    verify and LOAD then accepted."""
    path, _ = archive_file
    _untrusted(path, how, monkeypatch)
    if how == "writable by others":
        monkeypatch.setenv("FOUNDRY_ARCHIVE_KEY", KEY)  # the copy would be signed
    out = path.with_name("copy.foundry")
    assert cli.main(["pack", str(path), str(out)]) == cli.EXIT_BAD
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert ("not signed" if how == "unsigned" else "belongs to uid" if how == "another owner"
            else "writable by other users") in err
    assert not out.exists() and not out.with_name("copy.foundry.hmac").exists()


@pytest.mark.parametrize("how", ["writable by others", pytest.param("another owner", marks=needs_root)])
def test_sign_refuses_an_archive_another_user_could_have_written(archive_file, monkeypatch, capsys, how):
    """Before: sign wrote a valid tag for any file, so LOAD then trusted what another user had written."""
    path, _ = archive_file
    _untrusted(path, how, monkeypatch)
    monkeypatch.setenv("FOUNDRY_ARCHIVE_KEY", KEY)
    assert cli.main(["sign", str(path)]) == cli.EXIT_BAD
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "sign only what this user wrote" in err
    assert not path.with_name(path.name + ".hmac").exists()


def test_pack_of_a_trusted_archive_is_signed_and_verifies(tmp_path, monkeypatch, capsys):
    path = _signed(tmp_path, monkeypatch)
    out = tmp_path / "copy.foundry"
    assert cli.main(["pack", str(path), str(out)]) == cli.EXIT_OK
    assert cli.main(["verify", str(out), "--no-machine-check"]) == cli.EXIT_OK
    assert "signed with the configured key" in capsys.readouterr().out
