"""``fastervit quantize``: a model -> an int8 ONNX file (onnxruntime) or OpenVINO IR (NNCF) for CPU inference
(static, calibrated on real images)."""

from __future__ import annotations

import argparse
import sys

from open_fastervit.cli._common import json_dict
from open_fastervit.deploy.openvino import load_openvino, quantize_openvino
from open_fastervit.deploy.quantize import METHODS, load_quantized, quantize_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastervit quantize",
        description="Post-training static int8 quantization for CPU (onnxruntime, QDQ format): the model's fused "
        "inference form is exported to ONNX, activation ranges are calibrated on real images (read and "
        "preprocessed as `fastervit validate` does), and every Conv/MatMul/Gemm gets uint8 activations and int8 "
        "per-channel weights. The file keeps the class names and preprocessing, so `fastervit validate "
        "--checkpoint FILE`, `fastervit predict --checkpoint FILE` and `fastervit bench --models FILE` take it. "
        "Batch is dynamic; height and width are fixed at the evaluation size unless --dynamic-size. An --output "
        "ending in .xml quantizes with NNCF to an OpenVINO IR instead (needs openvino and nncf; --method applies "
        "to the onnxruntime route only).",
    )
    p.add_argument("source", help="model name, .safetensors, training checkpoint, official .pth.tar, or a "
                   "Hugging Face/timm model folder (as open_fastervit.load_model takes)")
    p.add_argument("--calib", required=True, metavar="DIR",
                   help="folder of real images for calibration, any depth (e.g. the train split); non-images "
                   "are skipped")
    p.add_argument("--output", "-o", required=True,
                   help="output file: model.int8.onnx (onnxruntime) or model.int8.xml (OpenVINO, NNCF)")
    p.add_argument("--num-calib", type=int, default=128,
                   help="calibration images (default 128; calibration keeps every activation of every image in "
                   "memory: about 30 MB per image for FasterViT-0 at 224 px)")
    p.add_argument("--img-size", type=int, default=None,
                   help="evaluation/calibration side in px (default: the checkpoint's or the model cfg's)")
    p.add_argument("--method", choices=tuple(METHODS), default="minmax", help="calibration (default minmax)")
    p.add_argument("--dynamic-size", action="store_true",
                   help="dynamic height and width from the model's bound up (FasterViT-0: 225; needs --img-size "
                   "at least that)")
    p.add_argument("--full-range", dest="reduce_range", action="store_false",
                   help="8-bit instead of 7-bit weights: only for CPUs with VNNI (AVX512-VNNI, AVX-VNNI, AMX); "
                   "on AVX2-only CPUs onnxruntime's int8 kernels saturate and accuracy drops")
    p.add_argument("--seed", type=int, default=0, help="order in which calibration files are picked")
    p.add_argument("--model", "-m", default=None, help="architecture of a weights file that names none")
    p.add_argument("--model-kwargs", type=json_dict, default={},
                   help='architecture overrides as JSON, e.g. \'{"dim": 32, "depths": [1, 1, 2, 1]}\'')
    p.add_argument("--raw", action="store_true", help="the raw weights of a training checkpoint (default: EMA)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``fastervit quantize``; 0 on success, 2 with a one-line message for bad arguments, sources or data."""
    args = build_parser().parse_args(argv)
    if args.output.endswith(".xml"):
        return _openvino(args)
    try:
        path = quantize_model(
            args.source, args.calib, args.output, num_calib=args.num_calib, img_size=args.img_size,
            method=args.method, dynamic_size=args.dynamic_size, reduce_range=args.reduce_range, seed=args.seed,
            architecture=args.model, model_kwargs=args.model_kwargs or None, use_ema=False if args.raw else None,
        )
        model = load_quantized(path)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:  # QuantizeError, CheckpointError: ValueError
        print(f"fastervit quantize: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    q, check = model.quantization, model.quantization["check"]
    skipped = f", {q['skipped_files']} unreadable files skipped" if q["skipped_files"] else ""
    print(f"calibrated on {q['num_calib']} images of {q['calib_dir']} ({q['method']}{skipped}) in {q['seconds']:.0f} s")
    print(f"check on {check['images']} calibration images: int8 vs fp32 top-1 agreement "
          f"{100 * check['top1_agreement']:.1f}%, largest relative logit error {check['max_rel_error']:.3f}")
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({size_mb:.1f} MiB; weights {q['weights']}, activations {q['activations']}; inputs "
          f"{model.describe_range()})")
    return 0


def _openvino(args: argparse.Namespace) -> int:
    """The NNCF route of ``fastervit quantize`` (an ``.xml`` output)."""
    try:
        path = quantize_openvino(
            args.source, args.calib, args.output, num_calib=args.num_calib, img_size=args.img_size,
            dynamic_size=args.dynamic_size, reduce_range=args.reduce_range, seed=args.seed, architecture=args.model,
            model_kwargs=args.model_kwargs or None, use_ema=False if args.raw else None,
        )
        model = load_openvino(path)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:  # QuantizeError, OpenVINOError: ValueError
        print(f"fastervit quantize: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    q = model.quantization or {}
    check = q["check"]
    skipped = f", {q['skipped_files']} unreadable files skipped" if q["skipped_files"] else ""
    print(f"calibrated on {q['num_calib']} images of {q['calib_dir']} (NNCF {q['nncf']}{skipped}) in "
          f"{q['seconds']:.0f} s")
    print(f"check on {check['images']} calibration images: int8 vs fp32 top-1 agreement "
          f"{100 * check['top1_agreement']:.1f}%, largest relative logit error {check['max_rel_error']:.3f}")
    size_mb = (path.stat().st_size + path.with_suffix(".bin").stat().st_size) / 2**20
    print(f"wrote {path} and {path.with_suffix('.bin').name} ({size_mb:.1f} MiB; OpenVINO int8; inputs "
          f"{model.describe_range()})")
    return 0
