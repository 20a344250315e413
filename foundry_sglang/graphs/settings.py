"""What the user asked Foundry to do: the mode, the archive directory, the settings that travel with them, their
defaults and their flags. Every ``FOUNDRY_*`` variable of foundry_sglang's graph settings is named and read here.

Every front end turns its flags (:func:`add_foundry_flags`, then :meth:`FoundryConfig.from_flags`) or its
environment (:meth:`FoundryConfig.from_env`) into one :class:`FoundryConfig`; :meth:`FoundryConfig.resolve` holds
the one default rule: with an archive directory the mode defaults to ``auto``, without one to ``off``. Between
processes the configuration travels as environment (:meth:`FoundryConfig.to_env` -> ``from_env``: SGLang's
scheduler processes) or as the built-in engine's flags (:meth:`FoundryConfig.engine_flags` -> ``from_flags``).

The variables (each read by :func:`_read_env` only):

* ``FOUNDRY_MODE`` / ``FOUNDRY_ARCHIVE``: the mode and the archive directory (SGLang's processes; the launchers'
  defaults for ``--foundry-mode`` / ``--foundry-archive``);
* ``FOUNDRY_RANKS_SHARE_GPU=1``: every rank of an SGLang TP/EP server runs on one GPU (``--foundry-ranks-share-gpu``
  of the launcher sets it);
* ``FOUNDRY_EARLY_LOAD=0``: the built-in engine's server does not start its LOAD before it imports torch, and an
  SGLang scheduler does not compute Triton's cache key on a thread while it loads the model (both are on by
  default);
* ``FOUNDRY_SLOT_FILLER=torch|nccl``: how a built-in engine rank fills collective slots at LOAD
  (:func:`slot_filler_choice`; default ``auto``).
"""
from __future__ import annotations

import argparse
import enum
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Union

from foundry_core.session import SessionMode

__all__ = [
    "DEFAULT_ARCHIVE_DIR", "ENV_ARCHIVE", "ENV_EARLY_LOAD", "ENV_MODE", "ENV_RANKS_SHARE_GPU", "ENV_SLOT_FILLER",
    "MODE_CHOICES", "MODE_HELP", "FoundryConfig", "FoundryMode", "add_foundry_flags", "slot_filler_choice",
]

ENV_MODE = "FOUNDRY_MODE"
ENV_ARCHIVE = "FOUNDRY_ARCHIVE"
ENV_RANKS_SHARE_GPU = "FOUNDRY_RANKS_SHARE_GPU"
ENV_EARLY_LOAD = "FOUNDRY_EARLY_LOAD"
ENV_SLOT_FILLER = "FOUNDRY_SLOT_FILLER"
#: Where the launcher and the SGLang plugin keep archives when no directory is given.
DEFAULT_ARCHIVE_DIR = "~/.cache/foundry_sglang"


class FoundryMode(str, enum.Enum):
    """What happens to the CUDA graphs of a process: off, or one of foundry_core's session modes."""

    OFF = "off"  # capture live, no archive
    AUTO = SessionMode.AUTO.value  # load a compatible archive, else capture and save one
    SAVE = SessionMode.SAVE.value  # always capture and (re)write the archive; any problem is an error
    LOAD = SessionMode.LOAD.value  # restore from the archive; a problem falls back to live capture (one log line)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: Union[str, "FoundryMode"]) -> "FoundryMode":
        """``value`` (any case, surrounding blanks ignored) as a mode; ValueError with one line otherwise."""
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ValueError(f"foundry mode {value!r} is not one of {', '.join(MODE_CHOICES)}") from None

    @property
    def session_mode(self) -> SessionMode:
        """The foundry_core session mode of an enabled mode (ValueError for off)."""
        if self is FoundryMode.OFF:
            raise ValueError("foundry mode off has no session")
        return SessionMode(self.value)

    @property
    def strict(self) -> bool:
        """Whether a problem raises instead of falling back to live capture (the one rule, used everywhere).

        Only an explicit ``save`` is strict: it is asked for to write the archive, so a server that could not is
        an error. ``load`` and ``auto`` fall back with one log line — an archive that is missing or incompatible,
        or a server flag that makes restoring unsafe — and serve the same results, only from live-captured
        graphs."""
        return self is FoundryMode.SAVE


#: The mode names, for argparse ``choices``.
MODE_CHOICES = tuple(m.value for m in FoundryMode)
#: One help text for every ``--foundry-mode`` flag.
MODE_HELP = ("auto (default with an archive directory): load a compatible archive, else capture and save one; "
             "save: always capture and (re)write, any problem is an error; load: restore, falling back to live "
             "capture with one log line when it cannot (archive missing or incompatible, a server flag that makes "
             "restoring unsafe); off (default without one): live capture, no archive")
#: ``--foundry-archive`` of the built-in engine's server.
ARCHIVE_HELP = "directory of the per-rank Foundry archives of the decode graphs (saved or loaded there)"


def add_foundry_flags(parser: Union[argparse.ArgumentParser, Any], archive_help: str = ARCHIVE_HELP,
                      mode_help: str = MODE_HELP) -> None:
    """``--foundry-archive DIR`` and ``--foundry-mode MODE`` on ``parser`` (or an argument group), both default
    None: the front end's rule in :meth:`FoundryConfig.from_flags` applies. Every parser that takes them adds them
    here; the help texts say what differs (the default directory, where the mode goes)."""
    parser.add_argument("--foundry-archive", dest="foundry_archive", metavar="DIR", default=None, help=archive_help)
    parser.add_argument("--foundry-mode", dest="foundry_mode", choices=MODE_CHOICES, default=None, help=mode_help)


class _Env(NamedTuple):
    mode: Optional[str]
    archive: Optional[str]
    ranks_share_gpu: bool
    early_load: bool
    slot_filler: str


def _read_env(environ: Optional[Mapping[str, str]]) -> _Env:
    """The raw values of every variable named above (``environ``; default ``os.environ``)."""
    env = os.environ if environ is None else environ
    return _Env(mode=env.get(ENV_MODE) or None, archive=env.get(ENV_ARCHIVE) or None,
                ranks_share_gpu=env.get(ENV_RANKS_SHARE_GPU) == "1",
                early_load=env.get(ENV_EARLY_LOAD, "1").strip() != "0",
                slot_filler=(env.get(ENV_SLOT_FILLER) or "auto").strip().lower())


def slot_filler_choice(environ: Optional[Mapping[str, str]] = None) -> str:
    """``FOUNDRY_SLOT_FILLER``: ``nccl`` (direct NCCL calls on torch's communicator), ``torch``
    (torch.distributed) or ``auto`` (the default: nccl when torch exposes its communicator)."""
    return _read_env(environ).slot_filler


@dataclass(frozen=True)
class FoundryConfig:
    """The resolved Foundry settings of one server (or deployment)."""

    mode: FoundryMode = FoundryMode.OFF
    archive_dir: Optional[Path] = None
    #: SGLang TP/EP: every rank on one GPU (``FOUNDRY_RANKS_SHARE_GPU``, ``--foundry-ranks-share-gpu``).
    ranks_share_gpu: bool = False
    #: The built-in engine's server starts its LOAD at process start, and an SGLang scheduler computes Triton's
    #: cache key while it loads the model (``FOUNDRY_EARLY_LOAD=0`` turns both off; no flag). On by default: the
    #: early load makes the median built-in LOAD start 0.26 s faster (bench/start.py).
    early_load: bool = True

    @property
    def enabled(self) -> bool:
        return self.mode is not FoundryMode.OFF

    @classmethod
    def resolve(cls, mode: Union[str, FoundryMode, None] = None, archive_dir: Union[str, os.PathLike, None] = None,
                ranks_share_gpu: bool = False, early_load: bool = True) -> "FoundryConfig":
        """Apply the default rule; ValueError (one line) on an unknown mode or a mode that needs a directory."""
        archive = Path(archive_dir).expanduser() if archive_dir else None
        if mode is None or str(mode).strip() == "":
            resolved = FoundryMode.AUTO if archive is not None else FoundryMode.OFF
        else:
            resolved = FoundryMode.parse(mode)
        if resolved is not FoundryMode.OFF and archive is None:
            raise ValueError(f"foundry mode {resolved} needs an archive directory (--foundry-archive)")
        return cls(mode=resolved, archive_dir=archive, ranks_share_gpu=bool(ranks_share_gpu),
                   early_load=bool(early_load))

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None,
                 default_archive_dir: Optional[str] = None) -> "FoundryConfig":
        """From ``FOUNDRY_*`` in ``environ`` (default ``os.environ``); ``default_archive_dir`` is used when a mode
        is set without a directory. ValueError (one line, naming the variable) on an unknown mode."""
        env = _read_env(environ)
        if env.mode is not None and env.mode.strip().lower() not in MODE_CHOICES:
            raise ValueError(f"{ENV_MODE}={env.mode!r} is not one of {', '.join(MODE_CHOICES)}")
        archive = env.archive
        if archive is None and env.mode is not None and default_archive_dir is not None:
            archive = default_archive_dir
        return cls.resolve(env.mode, archive, env.ranks_share_gpu, env.early_load)

    @classmethod
    def from_flags(cls, ns: argparse.Namespace, environ: Optional[Mapping[str, str]] = None, *,
                   env_defaults: bool = False, default_archive_dir: Optional[str] = None) -> "FoundryConfig":
        """From the flags :func:`add_foundry_flags` added to a parser (and ``--foundry-ranks-share-gpu`` where it
        has that flag). ``env_defaults`` (the launchers): ``FOUNDRY_MODE``/``FOUNDRY_ARCHIVE``/
        ``FOUNDRY_RANKS_SHARE_GPU`` fill what the flags leave unset; without it (the engine's server, whose flags
        are the whole configuration) they are ignored. ``default_archive_dir``: the directory when neither gives
        one. ``FOUNDRY_EARLY_LOAD`` has no flag and always comes from ``environ``. ValueError (one line) as for
        :meth:`resolve`."""
        env = _read_env(environ)
        mode = ns.foundry_mode or (env.mode if env_defaults else None)
        archive = ns.foundry_archive or (env.archive if env_defaults else None) or default_archive_dir
        share = bool(getattr(ns, "foundry_ranks_share_gpu", False)) or (env_defaults and env.ranks_share_gpu)
        return cls.resolve(mode, archive, share, env.early_load)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "FoundryConfig":
        """From a mapping of the fields (a YAML or JSON mapping, or ``dataclasses.asdict`` of one), with the
        default rule; ValueError (one line) on another key or a bad value."""
        known = ("archive_dir", "early_load", "mode", "ranks_share_gpu")
        unknown = sorted(set(doc) - set(known))
        if unknown:
            raise ValueError(f"unknown foundry setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        mode, archive = doc.get("mode"), doc.get("archive_dir")
        return cls.resolve(None if mode is None else str(mode), None if archive is None else str(archive),
                           bool(doc.get("ranks_share_gpu", False)), bool(doc.get("early_load", True)))

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (:meth:`from_dict` reads them back)."""
        return {"mode": self.mode.value, "archive_dir": None if self.archive_dir is None else str(self.archive_dir),
                "ranks_share_gpu": self.ranks_share_gpu, "early_load": self.early_load}

    def with_archive_dir(self, archive_dir: Union[str, os.PathLike]) -> "FoundryConfig":
        """The same mode with another archive directory (e.g. one elastic layout's own)."""
        return replace(self, archive_dir=Path(archive_dir))

    def engine_flags(self) -> list[str]:
        """``--foundry-archive DIR --foundry-mode MODE`` for an engine server or the launcher; [] when off.
        (``early_load`` has no flag: a child process inherits ``FOUNDRY_EARLY_LOAD`` with the environment.)"""
        if not self.enabled:
            return []
        return ["--foundry-archive", str(self.archive_dir), "--foundry-mode", self.mode.value]

    def to_env(self) -> dict[str, str]:
        """The environment that hands this configuration to child processes (``from_env`` reads it back)."""
        env = {ENV_MODE: self.mode.value}
        if self.archive_dir is not None:
            env[ENV_ARCHIVE] = os.path.abspath(self.archive_dir)
        if self.ranks_share_gpu:
            env[ENV_RANKS_SHARE_GPU] = "1"
        if not self.early_load:  # on is the default: only "off" needs saying
            env[ENV_EARLY_LOAD] = "0"
        return env
