"""``fastervit detect train|evaluate|predict``: see ``open_fastervit.cli._dense``."""

from __future__ import annotations

from open_fastervit.cli._dense import dense_main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return dense_main("detect", argv)
