"""HTTP inference server (``fastervit serve``): top-k classes of uploaded images, with dynamic batching.

Endpoints: ``POST /predict`` (an image as the multipart field ``file``, or the raw image bytes as the body) answers
``{"labels", "indices", "probs", "model", "weights"}``; ``GET /health`` reports the model, its device, the queue
depth and how many batches and requests were served; ``GET /`` is a small page to upload an image and see its top-5
as bars; ``GET /docs`` (Swagger UI) and ``GET /redoc`` are the API pages, their scripts served by the server itself
(from the ``fastapi-offline`` package, so they work offline); ``GET /openapi.json`` is the schema.

Why FastAPI on uvicorn: both are well kept and widely used, the handlers are async (a request waiting for its batch
holds no thread), multipart uploads are parsed by Starlette, and the OpenAPI schema and ``/docs`` page come for free.
A serving framework such as LitServe would add a dependency for dynamic batching, which is the few dozen lines of
asyncio in :class:`Batcher`.

What a request goes through:

1. The body is read with a size limit (:data:`MAX_UPLOAD_BYTES`, 413 past it, also for chunked uploads) and a time
   limit: each part of the body must arrive within ``timeout`` seconds (408 otherwise). A client that drops the
   connection mid-upload costs one log line. Connections that send no complete request within ``timeout`` seconds
   (and idle keep-alive connections) are closed by the server.
2. In a thread of the default pool: :func:`open_fastervit.data.read_image` (the reader of ``predict``, validation and
   training: 16-bit images are scaled, not clipped) checks the header, before decoding, against the pixel limit
   (:data:`MAX_PIXELS`, 413) and the accepted formats (:data:`~open_fastervit.data.UPLOAD_FORMATS`: JPEG, PNG, WebP,
   BMP, TIFF, GIF; others answer 415), decodes the image, and the model's evaluation transform (that of
   :class:`open_fastervit.inference.Predictor`, as in ``fastervit predict``; it resamples only the cropped region,
   so a 100000 x 1 image costs no more than a square one) makes the input tensor. Bad images answer 400.
3. The tensor joins the :class:`Batcher` queue; a background task takes up to ``max_batch`` requests, waiting at most
   ``max_wait_ms`` after the first for more, runs one forward pass in its own thread (so the event loop keeps
   accepting requests) and gives each request its own row.

A load-test client (many concurrent clients checking every answer) is in ``experiments/serve_load.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import h11
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from open_fastervit.data import (
    UPLOAD_FORMATS,
    ImageDecodeError,
    ImageFormatError,
    ImageTooLargeError,
    read_image,
)
from open_fastervit.inference import Predictor

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_PIXELS",
    "MAX_UPLOAD_BYTES",
    "TimedH11Protocol",
    "Batcher",
    "Classifier",
    "UploadError",
    "create_app",
    "load_for_serving",
    "serve",
]

#: Largest accepted upload (bytes); larger bodies answer 413.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Largest accepted image (width x height, read from the header before decoding); larger images answer 413.
MAX_PIXELS = 50_000_000
#: Seconds a connection may wait for a request's headers, or for each part of its body, before the server gives up on
#: it (408 for a body, a closed connection for headers).
DEFAULT_TIMEOUT = 30.0
#: Room for the multipart boundaries and headers around a file of MAX_UPLOAD_BYTES.
_MULTIPART_SLACK = 64 * 1024
#: Where the API pages' scripts and styles are served (the files of the ``fastapi-offline`` package).
DOCS_STATIC = "/docs-static"

logger = logging.getLogger("open_fastervit.serve")

Row = dict[str, list]


class UploadError(ValueError):
    """An upload that cannot be classified; ``status`` is the HTTP status to answer with (400, 408, 413 or 415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------------
# the model side: bytes -> tensor, batch -> top-k rows
# --------------------------------------------------------------------------------------------------


def load_for_serving(
    source: str | Path | None = None,
    *,
    architecture: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    use_ema: bool = True,
    pretrained: bool = True,
    fuse: bool = True,
) -> torch.nn.Module:
    """``open_fastervit.load_model(source)`` (default :data:`~open_fastervit.loading.DEFAULT_MODEL`) on CPU in its
    exact inference form (``open_fastervit.inference_form``; ``fuse=False``: as built, in eval mode), loaded by
    :class:`open_fastervit.inference.Predictor`; ``model.weights_info`` says what was loaded.

    Raises:
        CheckpointError: weights that cannot be had (offline), read or fitted.
        ValueError: unknown model name or bad architecture arguments.
    """
    return Predictor(source, architecture=architecture, model_kwargs=model_kwargs, use_ema=None if use_ema else False,
                     pretrained=pretrained, fuse=fuse, device="cpu").model


class Classifier:
    """The HTTP side of a :class:`~open_fastervit.inference.Predictor`: uploaded bytes in, top-k rows out.

    :meth:`preprocess` (any thread) turns uploaded bytes into a ``(3, H, W)`` tensor; calling the classifier on a list
    of such tensors runs one forward pass and returns one top-k row per tensor, in order. The model is used as it is
    given (as ``predict`` does with a module): pass it through :func:`load_for_serving` for the fused form.

    Attributes:
        predictor, model, device, names (class names), data_config, transform, k (top-k), max_pixels, model_name,
        weights, source.

    Raises:
        ValueError: ``topk`` < 1, bad device or class names (as :class:`~open_fastervit.inference.Predictor`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        classes: str | Path | Sequence[str] | None = None,
        topk: int = 5,
        img_size: int | None = None,
        device: str | torch.device | None = None,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.predictor = predictor = Predictor(model, classes=classes, img_size=img_size, device=device)
        self.model, self.device = predictor.model, predictor.device
        self.names = predictor.class_names
        self.data_config, self.transform = predictor.data_config, predictor.transform
        self.k = min(topk, predictor.num_classes)
        self.max_pixels = max_pixels
        self.model_name = predictor.name
        self.weights = str(predictor.info.get("weights", "unknown"))
        self.source = str(predictor.info.get("source", ""))

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Uploaded image bytes -> the model's input tensor ``(3, H, W)``.

        The header is checked before any pixel is decoded; the transform resamples only the region its crop keeps, so
        the work is bounded by ``max_pixels`` whatever the image's aspect ratio.

        Raises:
            UploadError: 413 for an image over ``max_pixels``; 415 for a format outside
                :data:`~open_fastervit.data.UPLOAD_FORMATS` (EPS, PDF, ICO, PPM, TGA ...); 400 for bytes that are not a
                readable image (unknown format, truncated, corrupt, samples that do not map to 8 bits).
        """
        try:
            image = read_image(io.BytesIO(data), name="upload", max_pixels=self.max_pixels, formats=UPLOAD_FORMATS)
        except ImageTooLargeError as e:
            raise UploadError(413, str(e)) from None
        except ImageFormatError as e:
            raise UploadError(415, str(e)) from None
        except ImageDecodeError as e:
            raise UploadError(400, str(e)) from None
        return self.transform(image)

    def __call__(self, inputs: list[torch.Tensor]) -> list[Row]:
        """One forward pass over ``inputs`` (``(3, H, W)`` tensors); row ``i`` is the top-k of ``inputs[i]``."""
        tops = self.predictor.postprocess(self.predictor.infer(torch.stack(inputs)), self.k)
        return [dict(labels=top.labels, indices=top.indices, probs=top.probs) for top in tops]


# --------------------------------------------------------------------------------------------------
# dynamic batching
# --------------------------------------------------------------------------------------------------


class Batcher:
    """Gathers concurrent requests into batches for ``run`` (a function of a list of inputs returning one result
    per input, in order).

    A background task on the server's event loop takes the first waiting request, waits up to ``max_wait_ms`` for
    more (or until ``max_batch`` are waiting), runs ``run`` on them in a dedicated thread and resolves each request's
    future with the result at its own position. Requests whose client has gone are dropped before the forward pass.
    ``max_batch=1`` serves one request at a time. An exception from ``run`` fails that batch's requests only.
    """

    def __init__(self, run: Callable[[list[Any]], list[Any]], max_batch: int = 16, max_wait_ms: float = 10.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.batches = 0
        self.requests = 0
        self._in_flight = 0
        self._pending: deque[tuple[Any, asyncio.Future]] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastervit-forward")

    @property
    def depth(self) -> int:
        """Requests waiting or in the forward pass now."""
        return len(self._pending) + self._in_flight

    async def submit(self, item: Any) -> Any:
        """Queue ``item`` and wait for its result."""
        self._start()
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._arrived.set()
        return await future

    def _start(self) -> None:
        """Start the batching task on the running loop (again if the loop changed, as under a test client)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop, self._arrived = loop, asyncio.Event()
            self._pending = deque(p for p in self._pending if not p[1].done() and p[1].get_loop() is loop)
            self._task = loop.create_task(self._work())

    async def stop(self) -> None:
        """Stop the batching task and its thread."""
        if self._task is not None and self._loop is asyncio.get_running_loop():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        self._executor.shutdown(wait=False)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastervit-forward")

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        """Wait for a first request, then up to ``max_wait`` for ``max_batch``; pop them."""
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = loop.time() + self.max_wait
        while len(self._pending) < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        taken = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
        return [(item, future) for item, future in taken if not future.done()]  # done: the client has gone

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self._in_flight = len(batch)
            try:
                results = await loop.run_in_executor(self._executor, self.run, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(batch)} inputs gave {len(results)} results")
            except Exception as e:  # noqa: BLE001  (fails this batch's requests, the server goes on)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
            else:
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
                self.batches += 1
                self.requests += len(batch)
            finally:
                self._in_flight = 0


# --------------------------------------------------------------------------------------------------
# the HTTP app
# --------------------------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


def _limited(receive: Callable[[], Awaitable[dict]], limit: int) -> Callable[[], Awaitable[dict]]:
    """An ASGI ``receive`` that raises :class:`_TooLarge` once the body passes ``limit`` bytes."""
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise _TooLarge
        return message

    return wrapped


def _timed(receive: Callable[[], Awaitable[dict]], timeout: float) -> Callable[[], Awaitable[dict]]:
    """An ASGI ``receive`` that raises :class:`UploadError` 408 when a message takes over ``timeout`` seconds."""

    async def wrapped() -> dict:
        try:
            return await asyncio.wait_for(receive(), timeout)
        except asyncio.TimeoutError:
            raise UploadError(408, f"upload: no data for {timeout:g} s; the upload is abandoned") from None

    return wrapped


async def _read_upload(request: Request, limit: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """The uploaded image: the multipart field ``file``, else the raw body; at most ``limit`` bytes, each part of the
    body within ``timeout`` seconds.

    Raises:
        UploadError: 413 past the limit, 408 past the timeout, 400 for an empty upload or a form without a ``file``
            field.
        ClientDisconnect: the client went away during the upload.
    """
    request = Request(request.scope, _timed(request.receive, timeout))
    too_large = UploadError(413, f"upload: over the limit of {limit:,} bytes ({limit / 2**20:.3g} MB)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + _MULTIPART_SLACK:
        raise too_large
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        limited = Request(request.scope, _limited(request.receive, limit + _MULTIPART_SLACK))
        try:
            form = await limited.form(max_files=1, max_fields=8)
        except _TooLarge:
            raise too_large from None
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise UploadError(400, "upload: the multipart form has no file field 'file' "
                                       "(send -F file=@image.jpg, or the image bytes as the body)")
            data = await upload.read(limit + 1)
        finally:
            await form.close()
    else:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        data = b"".join(chunks)
    if len(data) > limit:
        raise too_large
    if not data:
        raise UploadError(400, "upload: empty body (send an image as the multipart field 'file' or as the body)")
    return data


_PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["file"],
                       "properties": {"file": {"type": "string", "format": "binary"}}},
        },
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}


def _docs_pages(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` with their scripts served from :data:`DOCS_STATIC` (FastAPI's recipe for
    self-hosted docs; the files are those of the ``fastapi-offline`` package): no page loads anything from elsewhere."""
    static = resources.files("fastapi_offline").joinpath("static")
    app.mount(DOCS_STATIC, StaticFiles(directory=str(static)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - API",
            swagger_js_url=f"{root}{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_STATIC}/favicon.png", swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=root + app.openapi_url, title=f"{app.title} - API",
                              redoc_js_url=f"{root}{DOCS_STATIC}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{DOCS_STATIC}/favicon.png", with_google_fonts=False)


def create_app(
    model: torch.nn.Module,
    *,
    classes: str | Path | Sequence[str] | None = None,
    topk: int = 5,
    max_batch: int = 16,
    max_wait_ms: float = 10.0,
    img_size: int | None = None,
    device: str | torch.device | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    timeout: float = DEFAULT_TIMEOUT,
) -> FastAPI:
    """The FastAPI app serving ``model`` (used as given; see :func:`load_for_serving` for the fused form).

    ``app.state.classifier`` (:class:`Classifier`) and ``app.state.batcher`` (:class:`Batcher`) are exposed for tests
    and monitoring. The batching task starts with the first request and stops at shutdown. ``timeout`` (seconds) is
    the longest wait for each part of an upload's body (408 past it). A client that drops the connection during its
    upload is logged in one line (logger ``open_fastervit.serve``).

    Raises:
        ValueError: ``timeout`` <= 0, ``max_upload_bytes`` or ``max_pixels`` < 1; and as :class:`Classifier`.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if max_upload_bytes < 1 or max_pixels < 1:
        raise ValueError(f"max_upload_bytes and max_pixels must be >= 1, got {max_upload_bytes} and {max_pixels}")
    classifier = Classifier(model, classes=classes, topk=topk, img_size=img_size, device=device,
                            max_pixels=max_pixels)
    batcher = Batcher(classifier, max_batch=max_batch, max_wait_ms=max_wait_ms)
    page = resources.files("open_fastervit.deploy").joinpath("static/index.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await batcher.stop()

    app = FastAPI(title="open_fastervit", summary="FasterViT image classification", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.classifier = classifier
    app.state.batcher = batcher
    _docs_pages(app)

    @app.post("/predict", openapi_extra={"requestBody": _PREDICT_BODY})
    async def predict(request: Request) -> Any:
        """Top-k classes of one image: the multipart field ``file``, or the image bytes as the body."""
        try:
            data = await _read_upload(request, max_upload_bytes, timeout)
            x = await asyncio.to_thread(classifier.preprocess, data)
        except UploadError as e:
            raise HTTPException(status_code=e.status, detail=str(e)) from None
        except ClientDisconnect:
            client = request.client
            logger.warning("client %s dropped the connection during its upload",
                           f"{client.host}:{client.port}" if client else "?")
            return Response(status_code=400)  # nobody reads it: the connection is gone
        row = await batcher.submit(x)
        return {**row, "model": classifier.model_name, "weights": classifier.weights}

    @app.get("/health")
    async def health() -> dict:
        """Model, weights, device, input size, queue depth and the batches and requests served so far."""
        return dict(status="ok", model=classifier.model_name, weights=classifier.weights, source=classifier.source,
                    device=str(classifier.device), input_size=list(classifier.data_config["input_size"]),
                    num_classes=len(classifier.names), topk=classifier.k, queue=batcher.depth,
                    batches=batcher.batches, requests=batcher.requests, max_batch=batcher.max_batch,
                    max_wait_ms=batcher.max_wait * 1000)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    return app


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 connection with a deadline for each request's headers: a connection that has no request in
    progress ``timeout_keep_alive`` seconds after it opened (or after its last answer) is closed, so a client that
    connects and sends nothing, or half a header, holds no file descriptor for long. uvicorn's own keep-alive timer
    only covers the time after an answer, and any byte restarts it."""

    def connection_made(self, transport: Any) -> None:  # noqa: D102
        super().connection_made(transport)
        self._arm_deadline()

    def on_response_complete(self) -> None:  # noqa: D102
        super().on_response_complete()
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
        super().connection_lost(exc)

    def _arm_deadline(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
        self._deadline = self.loop.call_later(self.timeout_keep_alive, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline = None
        busy = self.cycle is not None and not self.cycle.response_complete
        if busy or self.transport.is_closing():
            return
        if self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0]:
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            logger.warning("client %s sent no complete request within %s s; connection closed", client,
                           self.timeout_keep_alive)
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def serve(model: torch.nn.Module, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          timeout: float = DEFAULT_TIMEOUT, **app_kwargs: Any) -> None:
    """Serve ``model`` with uvicorn until interrupted (one process; ``app_kwargs`` go to :func:`create_app`).

    ``timeout`` (seconds): the longest wait for a request's headers (the connection is closed), for each part of an
    upload's body (408) and on an idle keep-alive connection.

    Raises:
        ValueError: ``port`` outside 1-65535, ``timeout`` <= 0; and as :func:`create_app`.
    """
    import uvicorn  # imported only when a server starts (it sets up its own logging)

    if not 1 <= port <= 65535:
        raise ValueError(f"port must be in 1-65535, got {port}")
    app = create_app(model, timeout=timeout, **app_kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level, http=TimedH11Protocol, timeout_keep_alive=timeout)
