"""``fastervit convert``: an official ``.pth.tar`` (or any weights file we read) -> our safetensors."""

from __future__ import annotations

import argparse
import sys

from open_fastervit.loading import load_model
from open_fastervit.serialization import save_weights


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastervit convert",
        description="Convert an official FasterViT .pth.tar checkpoint into open_fastervit safetensors weights.",
    )
    p.add_argument("checkpoint", help="official checkpoint, e.g. fastervit_0_224_1k.pth.tar")
    p.add_argument("output", help="output .safetensors path")
    p.add_argument("--model", required=True, help="architecture, e.g. fastervit_0 (see `fastervit models`)")
    p.add_argument("--ema", action="store_true", help="take state_dict_ema instead of state_dict")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``fastervit convert``; 0 on success, 2 with a one-line message when the file cannot be converted."""
    args = build_parser().parse_args(argv)
    try:
        model = load_model(args.checkpoint, architecture=args.model, head="keep", use_ema=args.ema)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"fastervit convert: {e}", file=sys.stderr)
        return 2
    save_weights(model, args.output, metadata={"architecture": args.model, "source": str(args.checkpoint)})
    print(f"wrote {args.output} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0
