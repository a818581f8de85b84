"""``python -m dmsim`` is the ``dmsim`` command."""
from .cli import main

raise SystemExit(main())
