"""``python -m disagg``: see :mod:`disagg.cli`. Ctrl-C while torch and the kernels load (seconds), or anywhere
before the command's own handler, exits 130 with one line too: the package itself imports nothing heavy, so the
import below is where start-up is interrupted."""

import sys

try:
    from disagg.cli import main

    code = main()
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    code = 130
raise SystemExit(code)
