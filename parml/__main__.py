"""``python -m parml``: the same as the ``parml`` command."""
from .cli import main

main()
