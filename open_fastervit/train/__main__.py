"""``python -m open_fastervit.train`` is not a command: say which one is (with the arguments given), exit 2."""

import os
import shlex
import sys

args = " ".join(shlex.quote(a) for a in sys.argv[1:]) or "..."
processes = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE")
if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one message, not one per process
    print("open_fastervit.train is a library module, not a command; nothing was trained. Train with:\n"
          f"  fastervit train {args}\n"
          "or, on several processes:\n"
          f"  torchrun --nproc_per_node {processes or 'N'} -m open_fastervit.cli train {args}", file=sys.stderr)
sys.exit(2)
