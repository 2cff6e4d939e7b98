"""`python -m qt_serve.cli_serve` runs qt-serve (the same as the console script)."""

import sys

from qt_serve.cli import serve_main

sys.exit(serve_main())
