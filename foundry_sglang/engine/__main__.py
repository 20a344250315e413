"""``python -m foundry_sglang.engine``: the built-in engine's OpenAI server, with Foundry (``foundry_sglang.builtin``).
"""
import sys

from foundry_sglang.builtin.serve import main

sys.exit(main())
