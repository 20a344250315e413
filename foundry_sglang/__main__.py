"""``python -m foundry_sglang`` is ``python -m foundry_sglang.launch``."""
import sys

from foundry_sglang.launch import main

sys.exit(main())
