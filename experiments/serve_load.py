"""Load test of ``fastervit serve``: dynamic batching on (max-batch 16, max-wait 10 ms) against one request at a time
(max-batch 1), for a tiny and the demo-sized FasterViT with random weights at 64 px, on CPU.

One command reproduces the table (JSON + markdown under ``--out``)::

    python experiments/serve_load.py --out runs/serve                   # about 2 min
    python experiments/serve_load.py --out runs/serve --seconds 3 --models tiny   # smoke run

For each model the weights are saved to a safetensors file (architecture, ``model_kwargs`` and ``img_size`` in its
metadata), the expected answers are computed with ``open_fastervit.predict.predict(images, checkpoint=FILE)``, and
for each setting a real server (``fastervit serve FILE``, a uvicorn subprocess) is loaded by
:func:`open_fastervit.deploy.serve.load_test` with ``--clients`` concurrent clients, which compares every answer with
the expected one. The images are the validation photos of tiny-imagenet-10 (64 px JPEGs, one per request, cycling).
The load generator runs on the same machine as the server, so both share its cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from open_fastervit.demo import DEMO_MODEL_KWARGS

import open_fastervit
from open_fastervit.deploy.serve import free_port, load_test, server_process
from open_fastervit.paths import data_path
from open_fastervit.predict import expand_images, predict

MODELS = {
    "tiny": dict(dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=(7, 7, 3, 3)),
    "demo": dict(DEMO_MODEL_KWARGS),
}
SETTINGS = {"batched": ("16", "10"), "one-at-a-time": ("1", "0")}
IMG_SIZE = 64


def weights_file(name: str, folder: Path) -> Path:
    torch.manual_seed(0)
    model = open_fastervit.load_model("fastervit_0", pretrained=False, model_kwargs=MODELS[name], num_classes=10)
    path = folder / f"{name}.safetensors"
    open_fastervit.save_weights(model, path, metadata={"model_kwargs": MODELS[name], "img_size": IMG_SIZE})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/serve")
    parser.add_argument("--models", default="tiny,demo")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--images", type=int, default=64, help="distinct images sent (cycling)")
    parser.add_argument("--threads", type=int, default=1, help="server's torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    val = data_path("tiny-imagenet-10") / "val"
    photos = [p for folder in sorted(val.iterdir()) if folder.is_dir() for p in expand_images([folder])]
    images = photos[:: max(1, len(photos) // args.images)][: args.images]  # spread over the classes
    results = []
    for name in args.models.split(","):
        weights = weights_file(name, out)
        expected = predict(images, checkpoint=weights, topk=5, device="cpu")
        for setting, (max_batch, max_wait) in SETTINGS.items():
            options = ("--device", "cpu", "--max-batch", max_batch, "--max-wait-ms", max_wait, "--log-level",
                       "warning", "--threads", str(args.threads))
            with server_process(weights, free_port(), *options, log=out / f"{name}_{setting}.log") as url:
                report = load_test(url, images, clients=args.clients, seconds=args.seconds, expected=expected)
            print(f"{name:5s} {setting:14s} {report.summary()}", flush=True)
            results.append(dict(model=name, setting=setting, max_batch=int(max_batch), max_wait_ms=float(max_wait),
                                **report.as_dict()))
    (out / "load.json").write_text(json.dumps(dict(cpu_count=os.cpu_count(), torch=torch.__version__,
                                                   threads=args.threads, results=results), indent=2))
    lines = ["| model | setting | clients | requests | errors | lost | mismatches | p50 ms | p99 ms | req/s | "
             "mean batch | speed-up |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    single = {r["model"]: r["throughput"] for r in results if r["setting"] == "one-at-a-time"}
    for r in results:
        speedup = r["throughput"] / single[r["model"]] if single.get(r["model"]) else float("nan")
        lines.append(f"| {r['model']} | {r['setting']} | {r['clients']} | {r['requests']} | {r['errors']} | "
                     f"{r['lost']} | {r['mismatches']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['throughput']:.1f} | {r['mean_batch']:.1f} | {speedup:.2f}x |")
    (out / "load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    bad = sum(r["errors"] + r["lost"] + r["mismatches"] for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
