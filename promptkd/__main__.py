"""Entry point for `python -m promptkd`."""

import sys

from promptkd.cli import main

sys.exit(main())
