"""``fastervit serve``: an HTTP inference server with dynamic batching (``open_fastervit.deploy.serve``)."""

from __future__ import annotations

import argparse
import sys

import torch

from open_fastervit.cli._common import json_dict, port_number, positive_float, positive_int, random_weights_note
from open_fastervit.deploy.forms import choose_form
from open_fastervit.loading import DEFAULT_MODEL
from open_fastervit.runtime import PRECISION_CHOICES, RUNTIMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastervit serve",
        description="Serve a model over HTTP: POST /predict (an image as the multipart field 'file', or as the body) "
        "answers the top-k labels as JSON; GET /health reports the model and the queue; GET / is an upload page.",
    )
    parser.add_argument("model", metavar="SOURCE", nargs="?", default=None,
                        help="model name, weights file (.safetensors, training .pt, official .pth.tar), run folder, "
                        "Hugging Face / timm model folder, or a file of fastervit export / quantize (.pt2, .onnx) "
                        f"(default: {DEFAULT_MODEL} with its published weights)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights for a model name (no download; the answers mean nothing, for testing)")
    parser.add_argument("--architecture", default=None,
                        help="timm name to build for a weights file that names none (default: fastervit_0)")
    parser.add_argument("--model-kwargs", type=json_dict, default={},
                        help='architecture overrides as JSON, e.g. \'{"dim": 32, "num_classes": 10}\'')
    parser.add_argument("--raw", action="store_true",
                        help="use the raw weights of a training checkpoint instead of its EMA weights")
    parser.add_argument("--no-fuse", dest="fuse", action="store_false",
                        help="run the model as built instead of its fused inference form (same outputs, slower)")
    parser.add_argument("--img-size", type=positive_int, default=None, help="input size (default: from the model cfg)")
    parser.add_argument("--classes", default=None,
                        help="class names: a text file (one per line) or the training dataset folder")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--topk", "-k", type=positive_int, default=5, help="labels per answer (default 5)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    parser.add_argument("--port", type=port_number, default=8000, help="port, 1-65535 (default 8000)")
    parser.add_argument("--timeout", type=positive_float, default=30.0,
                        help="seconds a connection may take to send a request's headers or each part of its body "
                        "(408), and may stay idle between requests (default 30)")
    parser.add_argument("--max-batch", type=positive_int, default=16,
                        help="most concurrent requests run in one forward pass (default 16; 1: no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="how long a request may wait for others to join its batch (default 10 ms)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch intra-op threads of the forward pass (default: torch's; 1 suits a busy machine)")
    parser.add_argument("--max-upload-mb", type=positive_float, default=20.0, help="largest upload in MB (default 20)")
    parser.add_argument("--max-pixels", type=positive_int, default=None,
                        help="largest image, width x height (default 50,000,000)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="who runs the model (default auto: the fastest form at --max-batch, measured once and "
                        "cached; a file of export / quantize runs in its own runtime)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="fp32, bf16, fp16 or auto (default auto: fp32 unless asked; bf16 needs images to check "
                        "it against fp32, which a server does not have at start)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn log level (default info)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fastervit serve`` until interrupted; 1 with a one-line message for weights or arguments that fail."""
    # fastapi and uvicorn load only when a server starts (not for --help or a bad argument)
    from open_fastervit.deploy.serve import MAX_PIXELS, load_for_serving, serve

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_wait_ms < 0:
        parser.error(f"argument --max-wait-ms: {args.max_wait_ms:g} must be >= 0")
    random_weights_note("serve", args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = load_for_serving(args.model, architecture=args.architecture, model_kwargs=args.model_kwargs,
                                 use_ema=not args.raw, pretrained=not args.random_weights, fuse=args.fuse)
        chosen = choose_form(model, runtime=args.runtime, precision=args.precision, batch_size=args.max_batch,
                             size=(args.img_size, args.img_size) if args.img_size else None, device=args.device)
        print(f"fastervit serve: runtime {chosen.reason}", file=sys.stderr)
        model = chosen.module
        serve(model, host=args.host, port=args.port, log_level=args.log_level, timeout=args.timeout,
              classes=args.classes, topk=args.topk, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
              img_size=args.img_size,
              device=args.device, max_upload_bytes=int(args.max_upload_mb * 2**20),
              max_pixels=args.max_pixels or MAX_PIXELS)
    except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError; raised before serving starts
        print(f"fastervit serve: error: {e}", file=sys.stderr)
        return 1
    return 0
