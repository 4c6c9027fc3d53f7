"""`python -m server.cli ...` is `numbalm ...`."""

import sys

from server.cli import main

sys.exit(main())
