"""What the user asked Foundry to do: the mode, the archive directory, and their defaults (defined here only).

Every front end (the launcher, the built-in engine's CLI, the SGLang plugin's environment, the elastic launcher)
turns its flags or environment into one :class:`FoundryConfig` with :meth:`FoundryConfig.resolve`, which holds the
one default rule: with an archive directory the mode defaults to ``auto``, without one to ``off``.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Optional, Union

from foundry_core.session import SessionMode

__all__ = [
    "DEFAULT_ARCHIVE_DIR", "ENV_ARCHIVE", "ENV_MODE", "MODE_CHOICES", "MODE_HELP", "FoundryConfig", "FoundryMode",
]

ENV_MODE = "FOUNDRY_MODE"
ENV_ARCHIVE = "FOUNDRY_ARCHIVE"
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


#: The mode names, for argparse ``choices``.
MODE_CHOICES = tuple(m.value for m in FoundryMode)
#: One help text for every ``--foundry-mode`` flag.
MODE_HELP = ("auto (default with an archive directory): load a compatible archive, else capture and save one; "
             "save: always capture and (re)write; load: restore, falling back to live capture with one log line "
             "if the archive is missing or incompatible; off (default without one): live capture, no archive")


@dataclass(frozen=True)
class FoundryConfig:
    """The resolved Foundry settings of one server (or deployment)."""

    mode: FoundryMode = FoundryMode.OFF
    archive_dir: Optional[Path] = None

    @property
    def enabled(self) -> bool:
        return self.mode is not FoundryMode.OFF

    @classmethod
    def resolve(cls, mode: Union[str, FoundryMode, None] = None,
                archive_dir: Union[str, os.PathLike, None] = None) -> "FoundryConfig":
        """Apply the default rule; ValueError (one line) on an unknown mode or a mode that needs a directory."""
        archive = Path(archive_dir).expanduser() if archive_dir else None
        if mode is None or str(mode).strip() == "":
            resolved = FoundryMode.AUTO if archive is not None else FoundryMode.OFF
        else:
            resolved = FoundryMode.parse(mode)
        if resolved is not FoundryMode.OFF and archive is None:
            raise ValueError(f"foundry mode {resolved} needs an archive directory (--foundry-archive)")
        return cls(mode=resolved, archive_dir=archive)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None,
                 default_archive_dir: Optional[str] = None) -> "FoundryConfig":
        """``FOUNDRY_MODE``/``FOUNDRY_ARCHIVE``; ``default_archive_dir`` is used when a mode is set without one."""
        env = os.environ if environ is None else environ
        archive = env.get(ENV_ARCHIVE) or None
        mode = env.get(ENV_MODE) or None
        if archive is None and mode is not None and default_archive_dir is not None:
            archive = default_archive_dir
        return cls.resolve(mode, archive)

    @classmethod
    def from_dict(cls, doc: Mapping[str, object]) -> "FoundryConfig":
        """From ``{"mode": ..., "archive_dir": ...}`` (a YAML or JSON mapping, or ``dataclasses.asdict`` of one),
        with the default rule; ValueError (one line) on another key or a bad value."""
        unknown = sorted(set(doc) - {"mode", "archive_dir"})
        if unknown:
            raise ValueError(f"unknown foundry setting(s) {', '.join(unknown)}; known: archive_dir, mode")
        mode, archive = doc.get("mode"), doc.get("archive_dir")
        return cls.resolve(None if mode is None else str(mode), None if archive is None else str(archive))

    def with_archive_dir(self, archive_dir: Union[str, os.PathLike]) -> "FoundryConfig":
        """The same mode with another archive directory (e.g. one elastic layout's own)."""
        return replace(self, archive_dir=Path(archive_dir))

    def engine_flags(self) -> list[str]:
        """``--foundry-archive DIR --foundry-mode MODE`` for an engine server or the launcher; [] when off."""
        if not self.enabled:
            return []
        return ["--foundry-archive", str(self.archive_dir), "--foundry-mode", self.mode.value]

    def to_env(self) -> dict[str, str]:
        """The environment that hands this configuration to child processes (``from_env`` reads it back)."""
        env = {ENV_MODE: self.mode.value}
        if self.archive_dir is not None:
            env[ENV_ARCHIVE] = os.path.abspath(self.archive_dir)
        return env
