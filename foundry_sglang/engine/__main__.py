"""``python -m foundry_sglang.engine``: the built-in engine's OpenAI server."""
import sys

from .server import main

sys.exit(main())
