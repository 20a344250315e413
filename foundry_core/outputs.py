"""A graph's outputs: the pytree of tensors SAVE records (:func:`flatten_outputs`) and LOAD rebuilds over the
same addresses (:func:`tensor_at`, :func:`unflatten_outputs`), and the check that a stored structure fits its
tensors (:func:`output_structure`).

torch is imported inside the functions (deliberately): the early load (``foundry_core.early``) imports this
module, through ``restore``, on a thread that must not import torch.
"""
from __future__ import annotations

from typing import Any

from foundry_core import schema
from foundry_core.errors import ArchiveError, UnsupportedGraph

__all__ = ["flatten_outputs", "output_structure", "tensor_at", "tensor_spec", "unflatten_outputs"]


def tensor_spec(t) -> schema.TensorSpec:
    if t.numel() == 0:
        extent = 0
    else:
        extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return schema.TensorSpec(
        address=int(t.data_ptr()), dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
        strides=list(t.stride()), storage_bytes=extent * t.element_size(),
    )


def flatten_outputs(key: str, outputs: Any) -> tuple[list[schema.TensorSpec], str, dict]:
    """(tensor leaves, treespec JSON, constant leaves by leaf position) of a graph's outputs.

    Leaves that are not tensors — ``None`` for an optional field (SGLang's ``LogitsProcessorOutput``), or a
    plain bool/int/float/str — are constants of the graph and are stored by value."""
    import torch
    from torch.utils import _pytree as pytree

    if outputs is None:
        return [], "", {}
    if isinstance(outputs, torch.Tensor):
        return [tensor_spec(outputs)], "", {}
    leaves, spec = pytree.tree_flatten(outputs)
    constants = {}
    for i, leaf in enumerate(leaves):
        if leaf is None or (isinstance(leaf, (bool, int, float, str)) and not isinstance(leaf, torch.Tensor)):
            constants[i] = leaf
        elif not isinstance(leaf, torch.Tensor):
            raise UnsupportedGraph(
                f"graph {key!r}: output leaf of type {type(leaf).__name__} is not a tensor or a constant; return "
                "tensors (or register the container with torch.utils._pytree)"
            )
    try:
        tree = pytree.treespec_dumps(spec)
    except Exception as e:  # unregistered/unserialisable container
        raise UnsupportedGraph(f"graph {key!r}: output structure cannot be stored: {e}") from None
    return [tensor_spec(t) for t in leaves if isinstance(t, torch.Tensor)], tree, constants


def unflatten_outputs(tensors: list, tree: str, constants: dict):
    """The inverse of :func:`flatten_outputs` over restored tensors."""
    from torch.utils import _pytree as pytree

    if not tree:
        return tensors[0] if tensors else None
    it = iter(tensors)
    n = len(tensors) + len(constants)
    leaves = [constants[i] if i in constants else next(it) for i in range(n)]
    return pytree.tree_unflatten(leaves, pytree.treespec_loads(tree))


def tensor_at(spec: schema.TensorSpec, device: int):
    """A tensor over memory that already holds the saved output (no copy, no ownership)."""
    import torch

    class _Window:  # __cuda_array_interface__ over raw bytes; torch keeps this object alive with the tensor
        def __init__(self, address: int, nbytes: int):
            self.__cuda_array_interface__ = {
                "shape": (nbytes,), "typestr": "|u1", "data": (address, False), "version": 3, "strides": None,
            }

    dtype = getattr(torch, spec.dtype)
    nbytes = max(spec.storage_bytes, 1)
    with torch.cuda.device(device):
        raw = torch.as_tensor(_Window(spec.address, nbytes), device=f"cuda:{device}")
    flat = raw.view(dtype) if nbytes % dtype.itemsize == 0 else raw[: nbytes - nbytes % dtype.itemsize].view(dtype)
    return flat.as_strided(spec.shape, spec.strides)


def output_structure(rec: schema.GraphRecord):
    """The pytree structure of a graph's outputs, checked against their tensors and constants (None: a single
    tensor or none), so that :func:`unflatten_outputs` cannot fail at LOAD."""
    from torch.utils import _pytree as pytree

    constants = rec.output_constants
    if not rec.output_tree:
        if len(rec.outputs) > 1 or constants:
            raise ArchiveError(f"graph {rec.key[:60]!r} has {len(rec.outputs)} outputs and {len(constants)} "
                               "constants but no output structure")
        return None
    try:
        spec = pytree.treespec_loads(rec.output_tree)
        leaves = spec.num_leaves
    except RecursionError:
        raise ArchiveError(f"graph {rec.key[:60]!r}: output structure is nested too deep") from None
    except Exception as e:  # json/pytree errors of every kind: the string is not a structure SAVE wrote
        raise ArchiveError(f"graph {rec.key[:60]!r}: output structure is invalid ({type(e).__name__})") from None
    if leaves != len(rec.outputs) + len(constants) or any(not 0 <= k < leaves for k in constants):
        raise ArchiveError(f"graph {rec.key[:60]!r}: output structure has {leaves} leaves for {len(rec.outputs)} "
                           f"tensors and {len(constants)} constants")
    return spec
