"""``python -m open_fastervit.train`` is not a command: say which one is."""

import sys

print("open_fastervit.train is a library module; train with `fastervit train ...` or, on several processes, "
      "`torchrun --nproc_per_node N -m open_fastervit.cli train ...`", file=sys.stderr)
sys.exit(2)
