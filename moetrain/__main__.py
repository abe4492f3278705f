"""``python -m moetrain`` = the ``moetrain`` command."""

import sys

from moetrain.cli import main

sys.exit(main())
