"""Load test of ``fastervit serve``: dynamic batching on (max-batch 16, max-wait 10 ms) against one request at a time
(max-batch 1), for a tiny and the demo-sized FasterViT with random weights at 64 px, on CPU.

One command reproduces the table (JSON + markdown under ``--out``)::

    python experiments/serve_load.py --out runs/serve                   # about 2 min
    python experiments/serve_load.py --out runs/serve --seconds 3 --models tiny   # smoke run

For each model the weights are saved to a safetensors file (architecture, ``model_kwargs`` and ``img_size`` in its
metadata), the expected answers are computed with ``open_fastervit.predict.predict(images, checkpoint=FILE)``, and
for each setting a real server (``fastervit serve FILE``, a uvicorn subprocess started by :func:`server_process`) is
loaded by :func:`load_test` with ``--clients`` concurrent clients, which compares every answer with the expected one.
The images are the validation photos of tiny-imagenet-10 (64 px JPEGs, one per request, cycling). The load generator
runs on the same machine as the server, so both share its cores.

The load-test client (:func:`load_test`) and the server helpers (:func:`server_process`, :func:`free_port`) are
defined here; the serving tests import them from this file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import open_fastervit
from open_fastervit.demos.classification import DEMO_MODEL_KWARGS
from open_fastervit.paths import data_path
from open_fastervit.predict import Prediction, expand_images, predict

# ---- the load-test client --------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What :func:`load_test` saw. ``lost``: requests that got no HTTP answer (connection error, timeout);
    ``errors``: answers other than 200; ``mismatches``: 200 answers that differ from the expected prediction."""

    url: str
    clients: int
    seconds: float
    requests: int
    ok: int
    errors: int
    lost: int
    mismatches: int
    p50_ms: float
    p99_ms: float
    throughput: float
    batches: int
    mean_batch: float

    def summary(self) -> str:
        return (f"{self.clients} clients x {self.seconds:.1f} s: {self.requests} requests, {self.ok} ok, "
                f"{self.errors} errors, {self.lost} lost, {self.mismatches} mismatches; p50 {self.p50_ms:.1f} ms, "
                f"p99 {self.p99_ms:.1f} ms, {self.throughput:.1f} req/s, {self.batches} batches "
                f"(mean {self.mean_batch:.1f})")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _agrees(answer: Mapping[str, Any], expected: Prediction | Mapping[str, Any], tolerance: float) -> bool:
    want = asdict(expected) if isinstance(expected, Prediction) else expected
    return (answer.get("indices") == list(want["indices"]) and answer.get("labels") == list(want["labels"])
            and len(answer.get("probs", [])) == len(want["probs"])
            and all(abs(a - b) <= tolerance for a, b in zip(answer["probs"], want["probs"])))


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def _load(url: str, payloads: list[tuple[str, bytes]], expected: Sequence[Any] | None, clients: int,
                seconds: float, tolerance: float, timeout: float) -> LoadReport:
    import httpx

    base = url.rstrip("/")
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    counts = dict(requests=0, ok=0, errors=0, lost=0, mismatches=0)
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        name, data = payloads[0]
        (await client.post(f"{base}/predict", files={"file": (name, data)})).raise_for_status()  # warm-up
        before = (await client.get(f"{base}/health")).json()
        start = time.perf_counter()
        stop_at = start + seconds

        async def one_client(first: int) -> None:
            j = first
            while time.perf_counter() < stop_at:
                name, data = payloads[j % len(payloads)]
                want = expected[j % len(payloads)] if expected is not None else None
                j += clients
                counts["requests"] += 1
                sent = time.perf_counter()
                try:
                    response = await client.post(f"{base}/predict", files={"file": (name, data)})
                except httpx.HTTPError:
                    counts["lost"] += 1
                    continue
                latencies.append(time.perf_counter() - sent)
                if response.status_code != 200:
                    counts["errors"] += 1
                elif want is not None and not _agrees(response.json(), want, tolerance):
                    counts["mismatches"] += 1
                else:
                    counts["ok"] += 1

        await asyncio.gather(*(one_client(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
        after = (await client.get(f"{base}/health")).json()
    batches = after["batches"] - before["batches"]
    served = after["requests"] - before["requests"]
    return LoadReport(url=url, clients=clients, seconds=elapsed, **counts, p50_ms=1000 * _percentile(latencies, 50),
                      p99_ms=1000 * _percentile(latencies, 99), throughput=(counts["ok"] + counts["mismatches"])
                      / elapsed, batches=batches, mean_batch=served / batches if batches else 0.0)


def load_test(
    url: str,
    images: Sequence[str | Path | bytes],
    *,
    clients: int = 8,
    seconds: float = 3.0,
    expected: Sequence[Prediction | Mapping[str, Any]] | None = None,
    tolerance: float = 1e-5,
    timeout: float = 60.0,
) -> LoadReport:
    """Send ``clients`` concurrent streams of ``POST /predict`` to the server at ``url`` for ``seconds``.

    Client ``c`` sends images ``c, c + clients, ...`` (cycling), so concurrent requests carry distinct images when
    there are enough. Each answer is compared with ``expected[i]`` (e.g. ``open_fastervit.predict.predict(images,
    ...)`` with the server's weights): same indices and labels, probabilities within ``tolerance``. One warm-up
    request is sent first and not counted; batches are read from ``/health`` before and after.
    """
    if clients < 1 or seconds <= 0:
        raise ValueError(f"clients must be >= 1 and seconds > 0, got {clients} and {seconds}")
    if not images:
        raise ValueError("load_test needs at least one image")
    if expected is not None and len(expected) != len(images):
        raise ValueError(f"{len(expected)} expected predictions for {len(images)} images")
    payloads = [(f"image{i}", item) if isinstance(item, bytes) else (Path(item).name, Path(item).read_bytes())
                for i, item in enumerate(images)]
    return asyncio.run(_load(url, payloads, expected, clients, seconds, tolerance, timeout))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for test and benchmark servers)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(
    source: str | Path, port: int, *options: str, log: str | Path | None = None, timeout: float = 60.0
) -> Iterator[str]:
    """Run ``fastervit serve SOURCE --port PORT OPTIONS...`` in a subprocess (this Python) and yield its URL once
    ``/health`` answers; terminate it on exit. Output goes to ``log`` (default: discarded).

    Raises:
        RuntimeError: the server exited or did not answer within ``timeout`` seconds (the log's tail is included).
    """
    import httpx

    command = [sys.executable, "-m", "open_fastervit.cli", "serve", str(source), "--port", str(port), *options]
    url = f"http://127.0.0.1:{port}"
    with open(log or os.devnull, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = Path(log).read_text()[-2000:] if log else ""
                state = f"exited with {process.returncode}" if process.returncode is not None else "did not answer"
                raise RuntimeError(f"fastervit serve {state} ({' '.join(command)}):\n{tail}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---- the experiment ----------------------------------------------------------------------------------------------

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
