"""Bitwise comparison of graph outputs across processes: poison the outputs, replay, hash the bytes.

Outputs are filled with NaN (integers with -7) before every replay, so a replay that writes nothing cannot pass
for one that writes the right values. A graph is compared with another process's only when its own replays are
deterministic: hash two replays of the same inputs first (``replay_twice``).
"""
from __future__ import annotations

import hashlib


def leaves(out) -> list:
    """The tensors of an output (a tensor, or lists, tuples and dicts of them)."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in leaves(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in leaves(o)]
    return []


def poison(out) -> None:
    for t in leaves(out):
        t.fill_(float("nan") if t.is_floating_point() else -7)


def digest(out) -> str:
    """Hash of the bytes of every tensor of ``out`` (after the device finished writing them)."""
    import torch

    torch.cuda.synchronize()
    h = hashlib.sha256()
    for t in leaves(out):
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def replay_digest(replay, out) -> str:
    """Poison ``out``, call ``replay()`` (which writes it), hash it."""
    poison(out)
    replay()
    return digest(out)


def replay_twice(replay, out) -> tuple[str, str]:
    """Two poisoned replays of the same inputs: equal hashes say the graph is replay-to-replay deterministic."""
    return replay_digest(replay, out), replay_digest(replay, out)


def equal_count(reference: dict, other: dict) -> int:
    """How many of ``reference``'s hashes ``other`` has, key for key."""
    return sum(other.get(k) == v for k, v in reference.items())
