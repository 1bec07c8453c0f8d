"""``python -m entangle_fast``: the same as the ``entangle-fast`` command."""
import sys

from entangle_fast.cli import main

sys.exit(main())
