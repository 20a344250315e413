"""Foundry for the built-in engine: the adapter that mirrors the SGLang plugin (``foundry_sglang.plugin``).

Modules, one job each: :mod:`.keys` (which archive a rank uses), :mod:`.early` (the archive opened at process
start, before torch is imported), :mod:`.backend` (the graph backend over ``foundry_sglang.graphs``'s router,
and ``make_graph_backend``, the factory the engine is given), :mod:`.collectives` (the engine's collectives as
slots), :mod:`.template` (a TP/EP layout's rank template saved on one GPU) and :mod:`.serve` (``python -m
foundry_sglang.engine``: early load, then the engine's server with Foundry's factory).

Nothing is imported here, so that :mod:`.early` runs before torch.
"""
