"""``python -m dmsim`` is the ``dmsim`` command."""
from .cli import main

main()
