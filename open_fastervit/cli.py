"""The ``fastervit`` command: a thin dispatcher over the Python API.

Each sub-command lives in its own module, which exposes ``build_parser() -> argparse.ArgumentParser``
and ``main(argv: list[str] | None = None) -> int``. Modules are imported lazily so that
``fastervit --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("open_fastervit.demo", "train, evaluate, predict and benchmark on the demo data"),
    "train": ("open_fastervit.train", "train or fine-tune a FasterViT (timm recipe, DDP-ready)"),
    "validate": ("open_fastervit.validate", "top-1/top-5 of a model or checkpoint on a dataset"),
    "predict": ("open_fastervit.predict", "classify images and print the top-k labels"),
    "bench": ("open_fastervit.bench", "throughput/latency/memory against the official model and peers"),
    "convert": ("open_fastervit.convert", "convert an official .pth.tar checkpoint to safetensors"),
    "export": ("open_fastervit.export", "export to ONNX or torch.export"),
    "models": ("open_fastervit.zoo", "list the published architectures"),
}


def _usage() -> str:
    lines = ["usage: fastervit COMMAND [options]", "", "commands:"]
    for name, (_, help_text) in COMMANDS.items():
        lines.append(f"  {name:<10} {help_text}")
    lines.append("")
    lines.append("Run `fastervit COMMAND --help` for the options of one command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastervit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
