"""``fastervit export``: a model (any ``load_model`` source) -> ONNX, a ``torch.export`` program or an OpenVINO IR,
checked."""

from __future__ import annotations

import argparse
import sys

from open_fastervit.cli._common import json_dict
from open_fastervit.deploy.export import FORMATS, ExportError, export_model
from open_fastervit.inference import data_config_for
from open_fastervit.loading import load_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastervit export",
        description="Export a FasterViT to ONNX (standard domain, onnxruntime/TensorRT), to a torch.export "
        ".pt2 program or to an OpenVINO IR (.xml + .bin, needs openvino), then check the file against the eager "
        "model at several sizes (batch 1 and 3; square, "
        "non-square, padded). Batch is always dynamic; --dynamic-size makes height and width dynamic too, from "
        "the size where every transformer stage holds two windows per axis (FasterViT-0: 225 px) up. The range "
        "is stored in the file (ONNX metadata_props / .pt2 extra file / IR rt_info 'open_fastervit'). A file that "
        "fails the check is removed.",
    )
    p.add_argument("source", help="model name, .safetensors, training checkpoint, official .pth.tar, or a "
                   "Hugging Face/timm model folder (as open_fastervit.load_model takes)")
    p.add_argument("--output", "-o", required=True, help="output file (.onnx, .pt2 or .xml)")
    p.add_argument("--format", "-f", default=None, help=f"{', '.join(FORMATS)} (default: from the --output suffix)")
    p.add_argument("--model", "-m", default=None, help="architecture of a weights file that names none")
    p.add_argument("--random-weights", action="store_true",
                   help="a model name with random weights (no download; for testing the export only)")
    p.add_argument("--model-kwargs", type=json_dict, default={},
                   help='architecture overrides as JSON, e.g. \'{"dim": 32, "depths": [1, 1, 2, 1]}\'')
    p.add_argument("--raw", action="store_true", help="the raw weights of a training checkpoint (default: EMA)")
    p.add_argument("--fuse", action="store_true", help="export the fused inference form (same outputs)")
    p.add_argument("--dynamic-size", action="store_true", help="dynamic height and width (see above)")
    p.add_argument("--img-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="example size to export with; without --dynamic-size the fixed size (default: the "
                   "model's cfg size, raised to the dynamic range's bound with --dynamic-size)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--tolerance", type=float, default=1e-5,
                   help="largest relative error accepted in the check (default 1e-5, fp32)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``fastervit export``; 0 on success, 1 when the check fails, 2 with a one-line message for bad arguments,
    sources or sizes."""
    args = build_parser().parse_args(argv)
    fmt = args.format
    if fmt is None:
        fmt = next((f for f, suffix in FORMATS.items() if args.output.endswith(suffix)), None)
    if fmt not in FORMATS:
        what = f"unknown --format {args.format!r}" if args.format else f"cannot tell the format of {args.output!r}"
        print(f"fastervit export: error: {what}; use --format {' or '.join(FORMATS)} "
              f"({' / '.join(FORMATS.values())})", file=sys.stderr)
        return 2
    if args.opset is not None and fmt != "onnx":
        print("fastervit export: error: --opset applies to --format onnx only", file=sys.stderr)
        return 2
    try:
        model = load_model(args.source, architecture=args.model, use_ema=False if args.raw else None,
                           model_kwargs=args.model_kwargs, pretrained=not args.random_weights)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # CheckpointError is a ValueError
        print(f"fastervit export: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.random_weights:
        print(f"fastervit export: note: {args.source} has random weights (--random-weights)", file=sys.stderr)
    try:
        report = export_model(model, args.output, format=fmt, dynamic_size=args.dynamic_size,
                              example_size=tuple(args.img_size) if args.img_size else None, fuse=args.fuse,
                              opset=args.opset, tolerance=args.tolerance)
    except ExportError as e:
        report = getattr(e, "report", None)
        if report is None:  # refused before exporting: arguments
            print(f"fastervit export: error: {e}", file=sys.stderr)
            return 2
        print(report.table())
        print(f"fastervit export: check failed: largest relative error {report.max_error:.2e} > "
              f"{report.tolerance:g}; {report.path} was removed", file=sys.stderr)
        return 1
    print(report.table())
    _, own_h, own_w = data_config_for(model, getattr(model, "weights_info", None))["input_size"]
    (h_min, _), (w_min, _) = report.size_range
    if own_h < h_min or own_w < w_min:
        print(f"fastervit export: note: the model's own input size {own_h}x{own_w} is below this file's range "
              f"({report.describe_range()}); run it at --img-size {max(h_min, w_min)} or more, or export without "
              "--dynamic-size for a file at the model's size", file=sys.stderr)
    fused = ", fused" if report.fused else ""
    print(f"wrote {report.path} ({report.format}{fused}; inputs {report.describe_range()}; exported in "
          f"{report.seconds:.1f} s); largest relative error {report.max_error:.2e} <= {report.tolerance:g}")
    return 0
