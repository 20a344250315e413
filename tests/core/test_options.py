"""foundry_core's settings: one Options object, read from the environment once (Options.from_env) by Session and
the entry points used without one, and handed down as parameters (CPU)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import foundry_core as fc
from foundry_core import cli
from foundry_core.errors import DeviceUnavailable, FoundryError, UntrustedArchive
from foundry_core.options import DEFAULT_ARENA_BASE, ENV, Options

KEY = "a deployment secret of enough length"
VALUES = {  # field -> (environment value, the field's value)
    "cache_dir": ("/tmp/foundry-cache", Path("/tmp/foundry-cache")),
    "arena_base": ("0x7000000000", 0x7000000000),
    "arena_size": ("4096", 4096),
    "image_store": ("1", True),
    "allow_foreign_pointers": ("1", True),
    "snapshot_graph_pool": ("1", True),
    "module_globals": (" Refuse ", "refuse"),
    "archive_key": (KEY, KEY),
    "archive_key_file": ("/etc/foundry.key", Path("/etc/foundry.key")),
    "inflate_budget": ("0x10", 16),
    "libcupti": ("/opt/libcupti.so.13", "/opt/libcupti.so.13"),
}


def test_every_field_comes_from_its_variable():
    assert set(VALUES) == {f.name for f in dataclasses.fields(Options)} == set(ENV)
    for name, (text, value) in VALUES.items():
        assert getattr(Options.from_env({ENV[name]: text}), name) == value, name
    defaults = Options.from_env({"XDG_CACHE_HOME": "/x"})
    assert defaults == dataclasses.replace(Options(), cache_dir=Path("/x/foundry"))
    assert Options().arena_base == DEFAULT_ARENA_BASE and "secret" not in repr(Options(archive_key="secret key"))


@pytest.mark.parametrize("name, text", [("arena_base", "far away"), ("arena_size", "1 TiB"),
                                        ("inflate_budget", "lots"), ("module_globals", "sometimes")])
def test_a_bad_value_is_one_line_naming_the_variable(name, text):
    with pytest.raises(FoundryError, match=ENV[name]) as err:
        Options.from_env({ENV[name]: text})
    assert "\n" not in str(err.value)


def test_session_reads_the_environment_once_and_hands_its_options_down(archive_file, monkeypatch):
    """The key a Session was made with decides LOAD's trust check, whatever the environment says later; before,
    trust read FOUNDRY_ARCHIVE_KEY itself when the archive was opened."""
    path, _ = archive_file
    monkeypatch.setenv(ENV["archive_key"], KEY)
    keyed = fc.Session(path, mode="load")
    monkeypatch.delenv(ENV["archive_key"])
    assert keyed.options.archive_key == KEY
    with pytest.raises(UntrustedArchive, match="not signed"):
        keyed.open()
    with pytest.raises(DeviceUnavailable):  # without a key the archive is trusted: the next check is the GPU's
        fc.Session(path, mode="load").open()
    with pytest.raises(UntrustedArchive, match="not signed"):
        fc.Session(path, mode="load", options=Options(archive_key=KEY)).open()


def test_session_takes_its_defaults_from_its_options(tmp_path, monkeypatch):
    s = fc.Session(tmp_path / "a.foundry", options=Options(image_store=True, arena_base=0x7000000000))
    assert s.image_store is not None and s._arena_args[0] == 0x7000000000
    assert fc.Session(tmp_path / "a.foundry", image_store=False, options=Options(image_store=True)).image_store is None
    monkeypatch.setenv(ENV["arena_base"], "nowhere")
    with pytest.raises(FoundryError, match="FOUNDRY_ARENA_BASE"):  # at once, not when the arena is reserved
        fc.Session(tmp_path / "a.foundry")


def test_the_cli_reads_the_environment_once(archive_file, monkeypatch, capsys):
    path, _ = archive_file
    monkeypatch.setenv(ENV["inflate_budget"], "not a number")
    assert cli.main(["inspect", str(path)]) == cli.EXIT_BAD
    assert "FOUNDRY_INFLATE_BUDGET" in capsys.readouterr().err
