"""``python -m disagg``: see :mod:`disagg.cli`."""

from disagg.cli import main

raise SystemExit(main())
