"""Options shared by several commands: naming a model and its weights, and the one precision vocabulary."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from open_fastervit.loading import DEFAULT_MODEL, architecture_name
from open_fastervit.runtime import AMP_CHOICES, DEPRECATED_AMP

__all__ = [
    "AMP_CHOICES",
    "add_model_args",
    "amp_word",
    "json_dict",
    "model_call_args",
    "non_negative_int",
    "port_number",
    "positive_float",
    "positive_int",
    "random_weights_note",
]

def _int_at_least(text: str, low: int) -> int:
    """``text`` as an integer >= ``low``; argparse prefixes the option's name to the error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 given on the command line (argparse names the option in its error).

    Raises:
        argparse.ArgumentTypeError: not an integer, or below 0.
    """
    return _int_at_least(text, 0)


def positive_int(text: str) -> int:
    """An integer >= 1 given on the command line (argparse names the option in its error).

    Raises:
        argparse.ArgumentTypeError: not an integer, or below 1.
    """
    return _int_at_least(text, 1)


def positive_float(text: str) -> float:
    """A finite number > 0 given on the command line (seconds, sizes; argparse names the option in its error).

    Raises:
        argparse.ArgumentTypeError: not a number, or not > 0.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def port_number(text: str) -> int:
    """A TCP port, 1-65535, given on the command line.

    Raises:
        argparse.ArgumentTypeError: not an integer, or outside 1-65535.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1-65535, got {text}")
    return value


def amp_word(text: str, option: str = "--amp") -> str:
    """``none`` / ``bf16`` / ``fp16``; the old spellings (``bfloat16``, ``float16``, ``fp32``) with a deprecation note.

    Raises:
        argparse.ArgumentTypeError: any other word.
    """
    word = text.strip().lower()
    if word in AMP_CHOICES:
        return word
    if word in DEPRECATED_AMP:
        new = DEPRECATED_AMP[word]
        print(f"fastervit: note: {option} {text} is deprecated; use {option} {new}", file=sys.stderr)
        return new
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(AMP_CHOICES)}, got {text!r}")


def json_dict(text: str) -> dict:
    """A JSON object given on the command line.

    Raises:
        argparse.ArgumentTypeError: not JSON, or not an object.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"dim\": 32}}', got {text!r}")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options naming a model and its weights: timm name, checkpoint or --random-weights, architecture overrides,
    EMA/raw, input size, device, fused form."""
    parser.add_argument("--model", "-m", default=None,
                        help=f"timm model name (default: the checkpoint's architecture, else {DEFAULT_MODEL})")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", "-c", default=None, metavar="FILE",
                         help="weights: our .safetensors, a training checkpoint or run folder, an official .pth.tar, "
                         "a Hugging Face/timm model folder, or a file of fastervit export / quantize (.pt2, .onnx) "
                         "(default: the model's published weights, from the Hugging Face hub or its cache)")
    weights.add_argument("--random-weights", action="store_true",
                         help="use random weights (no download; the answers mean nothing, for testing only)")
    parser.add_argument("--model-kwargs", type=json_dict, default={},
                        help='architecture overrides as JSON, e.g. \'{"dim": 32, "depths": [1, 1, 2, 1]}\'')
    parser.add_argument("--raw", action="store_true",
                        help="use the raw weights of a training checkpoint instead of its EMA weights")
    parser.add_argument("--img-size", type=positive_int, default=None, help="input size (default: from the model cfg)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--no-fuse", dest="fuse", action="store_false",
                        help="run the model as built instead of its fused inference form (same outputs, slower)")


def model_call_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``validate`` / ``predict`` keyword arguments of the options added by :func:`add_model_args`."""
    return dict(checkpoint=args.checkpoint, model_kwargs=args.model_kwargs, use_ema=not args.raw,
                img_size=args.img_size, device=args.device, fuse=args.fuse, pretrained=not args.random_weights)


def random_weights_note(command: str, args: argparse.Namespace) -> None:
    """Say on stderr that the answers come from random weights (asked for with --random-weights).

    Nothing is said for a model name that does not resolve: the command's own error about the name follows, and a
    note about a model that will not be built would only mislead."""
    if args.random_weights:
        if args.model:
            try:
                architecture_name(args.model)
            except ValueError:
                return
        print(f"fastervit {command}: note: {args.model or DEFAULT_MODEL} has random weights (--random-weights); "
              "its answers mean nothing", file=sys.stderr)
