"""``fastervit models``: the published architectures, their size, resolution and accuracy."""

from __future__ import annotations

import argparse

from open_fastervit.zoo import list_models


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="fastervit models", description="List the published FasterViT models.")


def main(argv: list[str] | None = None) -> int:
    """Print one row per published model; 0."""
    build_parser().parse_args(argv)
    print(f"{'model':<22}{'params':>15}{'res':>6}{'top-1':>7}{'top-5':>7}")
    for row in list_models():
        print(f"{row['name']:<22}{row['params']:>15,}{row['input_size']:>6}{row['top1']:>7}{row['top5']:>7}")
    return 0
