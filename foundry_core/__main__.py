"""``python -m foundry_core``: see :mod:`foundry_core.cli`."""
import sys

from foundry_core.cli import main

sys.exit(main())
