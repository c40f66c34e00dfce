"""The ``fastervit`` command: a thin dispatcher over the Python API.

Each sub-command lives in its own module ``open_fastervit.cli.<command>``, which exposes
``build_parser() -> argparse.ArgumentParser`` and ``main(argv: list[str] | None = None) -> int`` calling one Python
function. Modules are imported lazily so that ``fastervit --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["COMMANDS", "main"]

COMMANDS: dict[str, str] = {
    "demo": "train, evaluate, predict and benchmark on the demo data",
    "train": "train or fine-tune a FasterViT (timm recipe, DDP-ready)",
    "validate": "top-1/top-5 of a model or checkpoint on a dataset",
    "detect": "object detection / instance segmentation: train, evaluate, predict (torchvision detectors)",
    "segment": "semantic segmentation: train, evaluate, predict (UPerNet / FPN decoders)",
    "predict": "classify images and print the top-k labels",
    "serve": "HTTP inference server with dynamic batching and an upload page",
    "bench": "throughput/latency/memory against the official model and peers",
    "convert": "convert an official .pth.tar checkpoint to safetensors",
    "export": "export to ONNX or a torch.export .pt2 (dynamic batch and size), checked",
    "quantize": "int8 static quantization for CPU (onnxruntime), calibrated on real images",
    "models": "list the published architectures",
}


def _usage() -> str:
    lines = ["usage: fastervit COMMAND [options]", "", "commands:"]
    for name, help_text in COMMANDS.items():
        lines.append(f"  {name:<10} {help_text}")
    lines.append("")
    lines.append("Run `fastervit COMMAND --help` for the options of one command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``fastervit COMMAND ...`` to ``open_fastervit.cli.COMMAND.main``; 2 for an unknown command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastervit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{name}")
    return int(module.main(rest) or 0)
