"""``python -m open_fastervit.cli COMMAND ...`` (e.g. under ``torchrun -m``)."""

import sys

from open_fastervit.cli import main

sys.exit(main())
