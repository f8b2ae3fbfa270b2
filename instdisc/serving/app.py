"""`instdisc serve`: an HTTP embedding service (FastAPI + uvicorn) on one ONNX Runtime session.

    POST /embed     one image as the body (Content-Type image/* or application/octet-stream), or
                    multipart/form-data with one or more files -> unit-norm vectors + model hash
    POST /search    one image (same body forms), ?k=10 -> top-k ids and cosine scores of the index
                    (exact; with a FAISS index loaded, approximate unless ?exact=true; when
                    the approximate search finds fewer than k, the answer is exact and says so)
    GET  /health    the process answers
    GET  /ready     model loaded and running on the provider that was asked for (else 503)
    GET  /metadata  model sha256 / registry version, input size, feature dim, provider, limits
    GET  /metrics   Prometheus text: requests by route and status, latency, images in flight

Every bad request gets a 4xx JSON body `{"error": "<what is wrong>"}` and the service carries on:
400 unreadable, truncated or empty image, empty batch; 413 body over `max_body_bytes` or image
over `max_pixels` or longer than `max_aspect` times its width (checked from the header, before
decoding: decompression bombs, 1xN strips); 415 another Content-Type; 422 bad query values; 408
a body that has not arrived within `body_timeout_s`; 503 more than `max_pending` images in flight
(busy); 401 a missing or wrong API key (when the app has one; /health stays open). /docs and
/openapi.json exist only with `docs=True`. A client that leaves before its body is read costs
one INFO line. Connection limits and timeouts: `serving.server`. Concurrent requests are grouped
onto the session by `MicroBatcher`; images are decoded on a small thread pool so decoding does
not starve ORT's intra-op threads. Needs fastapi, uvicorn, python-multipart, prometheus-client,
onnxruntime, numpy and Pillow only:
no torch, dvc or prefect (tests/serving/test_app.py checks it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import io
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException

from instdisc.data.decode import DECODE_ERRORS, decode_rgb
from instdisc.io import file_sha256
from instdisc.serving.embedder import Embedder
from instdisc.serving.search import Index, search

log = logging.getLogger(__name__)

RAW_TYPES = ("application/octet-stream",)  # besides image/*


@dataclass(frozen=True)
class Limits:
    """What one request may send; over a limit is a 4xx, never a crash or an OOM."""

    max_body_bytes: int = 16 * 2**20
    max_pixels: int = 40_000_000  # per image, read from the header before decoding
    # longer side / shorter side, from the header: the resize scales the shorter side to the
    # model input, so a 1x500000 image (1 KB) would otherwise become 32x16000000
    max_aspect: int = 20
    max_images: int = 64  # files per multipart request
    max_k: int = 1000
    body_timeout_s: float = 30.0  # the whole body must arrive within this, else 408
    max_pending: int = 256  # images being decoded or waiting for the session, else 503

    def __post_init__(self) -> None:
        for key, value in dataclasses.asdict(self).items():
            if value < 1:
                raise ValueError(f"{key} = {value}: must be >= 1")


class RequestError(Exception):
    """A client error: HTTP `status` and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class MicroBatcher:
    """Runs `run(batch)` once for the images of all requests that arrive within `max_wait_s` of
    each other, up to `max_batch` images (a single larger request runs alone), on one thread.

    `submit(pixels)` with uint8 (n, H, W, 3) returns a Future of the (n, D) rows for it.
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int = 64,
                 max_wait_s: float = 0.002) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch = {max_batch} must be >= 1 and max_wait_s = "
                             f"{max_wait_s} >= 0")
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.batches = self.images = 0  # counters for /metadata
        self._queue: queue.Queue = queue.Queue()
        self._carry: tuple[np.ndarray, Future] | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self.running:
            self._queue.put(None)
            self._thread.join()

    def submit(self, pixels: np.ndarray) -> Future:
        future: Future = Future()
        self._queue.put((pixels, future))
        return future

    def _loop(self) -> None:
        while (group := self._next_group()) is not None:
            self._run_group(group)

    def _next_group(self) -> list[tuple[np.ndarray, Future]] | None:
        first, self._carry = self._carry or self._queue.get(), None
        if first is None:
            return None
        group, count = [first], len(first[0])
        deadline = time.monotonic() + self.max_wait_s
        while count < self.max_batch and (wait := deadline - time.monotonic()) > 0:
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                break
            if item is None or count + len(item[0]) > self.max_batch:
                self._carry = item  # a stop or the next group's first request
                if item is None:
                    self._queue.put(None)
                    self._carry = None
                break
            group.append(item)
            count += len(item[0])
        return group

    def _run_group(self, group: list[tuple[np.ndarray, Future]]) -> None:
        batch = np.concatenate([pixels for pixels, _ in group])                 # (B, H, W, 3)
        try:
            out = self.run(batch)                                               # (B, D)
        except Exception as err:  # handed to every waiting request, the thread keeps serving
            for _, future in group:
                future.set_exception(err)
            return
        self.batches, self.images = self.batches + 1, self.images + len(batch)
        start = 0
        for pixels, future in group:
            future.set_result(out[start:start + len(pixels)])                  # (n, D)
            start += len(pixels)


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a Content-Length over `max_bytes` before reading anything, and
    for a streamed (chunked) body as soon as it passes `max_bytes`; 408 when the body has not
    fully arrived `timeout_s` after the app started reading it (a slow upload)."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _too_large(self.max_bytes, int(length))(scope, receive, send)
        seen, deadline, done = 0, None, False

        async def limited_receive() -> dict:
            nonlocal seen, deadline, done
            if done:  # the body is read: what is left is the disconnect, with no deadline
                return await receive()
            deadline = deadline or time.monotonic() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                raise BodyTimeout from None
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: int, size: int | None = None) -> JSONResponse:
    got = f"{size} bytes" if size is not None else "more"
    return JSONResponse({"error": f"request body too large: {got}, the limit is {limit} bytes "
                                  "(--max-body-bytes)"}, status_code=413)


def decode_upload(data: bytes, name: str, max_pixels: int, max_aspect: int) -> Image.Image:
    """Encoded image bytes -> RGB image; RequestError naming `name` and the problem."""
    if not data:
        raise RequestError(400, f"{name}: empty image (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"{name}: {err}") from None
    except DECODE_ERRORS:
        raise RequestError(400, f"{name}: not an image (Pillow cannot identify the bytes)") from None
    if width * height > max_pixels:
        raise RequestError(413, f"{name}: {width}x{height} = {width * height} pixels, over the "
                                f"limit of {max_pixels} per image (--max-pixels)")
    if max(width, height) > max_aspect * max(1, min(width, height)):
        raise RequestError(413, f"{name}: {width}x{height} has an aspect ratio over the limit "
                                f"of {max_aspect}:1 (--max-aspect); resizing its shorter side "
                                "to the model input would make it too large")
    try:
        return decode_rgb(data)[0]
    except DECODE_ERRORS as err:
        raise RequestError(400, f"{name}: cannot decode the image ({err}): truncated or "
                                "corrupt?") from None


async def read_images(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the request body (raw or multipart)."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media == "multipart/form-data":
        form = await request.form(max_files=limits.max_images, max_fields=limits.max_images,
                                  max_part_size=limits.max_body_bytes)
        files = [(value.filename or key, await value.read()) for key, value in form.multi_items()
                 if isinstance(value, UploadFile)]
        if not files:
            raise RequestError(400, "empty batch: the multipart body has no file parts")
        return files
    if media.startswith("image/") or media in RAW_TYPES:
        body = await request.body()
        if not body:
            raise RequestError(400, "empty body: send the encoded image bytes")
        return [("body", body)]
    raise RequestError(415, f"unsupported Content-Type {content_type or '(none)'!r}: send one "
                            "image as image/* or application/octet-stream, or files as "
                            "multipart/form-data")


def create_app(embedder: Embedder, *, index: Index | None = None,
               model_version: str | None = None, limits: Limits = Limits(),
               max_batch: int = 64, max_wait_ms: float = 2.0,
               decode_threads: int | None = None, ann: Any | None = None,
               ann_kind: str | None = None, api_key: str | None = None,
               docs: bool = False, server_limits: Any | None = None) -> FastAPI:
    """The FastAPI app serving `embedder` (and `index` for /search); see the module docstring.

    `ann` is a FAISS index over `index`'s embeddings (`instdisc.serving.ann.load_faiss`, of
    kind `ann_kind`): /search then answers from it unless the request asks ?exact=true.
    With `api_key`, every route but /health needs `Authorization: Bearer <api_key>` (else 401).
    `docs` publishes /docs and /openapi.json (off by default). `server_limits`
    (`serving.server.ServerLimits`, what the server runs with) is shown in /metadata.
    """
    if index is not None:
        index.check_model(embedder)
    if ann is not None and (index is None or ann.ntotal != len(index.ids)):
        raise ValueError("an ANN index needs the index it was built from (--index): "
                         f"{'no index' if index is None else f'{len(index.ids)} items'} vs "
                         f"{ann.ntotal} in the ANN index")
    method = (ann_kind or "ann") if ann is not None else "exact"
    if ann is not None:
        from instdisc.serving.ann import ann_search  # faiss only when an ANN index is loaded
    sha256 = file_sha256(embedder.model_path)
    model = {"sha256": sha256, "version": model_version, "file": embedder.model_path.name}
    batcher = MicroBatcher(embedder.run, max_batch, max_wait_ms / 1000)
    decoders = ThreadPoolExecutor(decode_threads or min(4, os.cpu_count() or 1),
                                  thread_name_prefix="decode")

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        log.info("serving %s (sha256 %s) on %s%s", embedder.model_path, sha256[:12],
                 embedder.provider, f" with an index of {len(index.ids)}" if index else "")
        yield
        batcher.stop()
        decoders.shutdown(wait=False)

    app = FastAPI(title="instdisc embedding service", lifespan=lifespan,
                  **({} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}))
    counters = RequestMetrics(batcher)
    counters.model.labels(sha256).set(1)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    app.add_middleware(Guard, api_key=api_key, metrics=counters)  # outermost: auth, then metrics
    _add_error_handlers(app, limits)
    pending = 0  # images accepted and not yet embedded (the event loop is single-threaded)

    def prepare(name: str, data: bytes) -> np.ndarray:
        return embedder.prepare(decode_upload(data, name, limits.max_pixels,
                                                     limits.max_aspect))  # (H, W, 3)

    async def embed_files(files: list[tuple[str, bytes]]) -> np.ndarray:
        nonlocal pending
        if pending + len(files) > limits.max_pending:
            raise RequestError(503, f"service busy: {pending} images in flight, the limit is "
                                    f"{limits.max_pending} (--max-pending); retry later")
        pending += len(files)
        counters.pending.set(pending)
        try:
            loop = asyncio.get_running_loop()
            pixels = await asyncio.gather(*(loop.run_in_executor(decoders, prepare, name, data)
                                            for name, data in files))
            return await asyncio.wrap_future(batcher.submit(np.stack(pixels)))  # (n, D)
        finally:
            pending -= len(files)
            counters.pending.set(pending)

    @app.post("/embed")
    async def embed(request: Request) -> dict[str, Any]:
        vectors = await embed_files(await read_images(request, limits))         # (n, D)
        return {"model": model, "count": len(vectors), "dim": int(vectors.shape[1]),
                "embeddings": vectors.tolist()}

    @app.post("/search")
    async def search_index(request: Request, k: int = Query(10, ge=1, le=limits.max_k),
                           exact: bool = Query(False)):
        if index is None:
            raise RequestError(404, "this server has no index: start it with --index <folder "
                                    "written by instdisc embed>")
        files = await read_images(request, limits)
        if len(files) != 1:
            raise RequestError(400, f"/search takes one image, got {len(files)}")
        query = await embed_files(files)                                        # (1, D)
        loop = asyncio.get_running_loop()
        if ann is None or exact:
            used = "exact"
            scores, rows = await loop.run_in_executor(None, search, index.embeddings, query, k)
        else:
            used = method
            scores, rows = await loop.run_in_executor(None, ann_search, ann, query, k)
            found = int((rows[0] >= 0).sum())
            if found < min(k, len(index.ids)):  # never fewer hits than asked without a word
                log.info("%s search found %d of k=%d neighbours: answered exactly", method,
                         found, k)
                used = f"exact ({method} found {found} of {k})"
                scores, rows = await loop.run_in_executor(None, search, index.embeddings,
                                                          query, k)
        return {"model": model, "k": k, "search": used, "hits": [
            {"id": index.ids[r], "score": float(s)} for r, s in zip(rows[0], scores[0])
            if r >= 0]}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> JSONResponse:
        active = embedder.provider == embedder.requested
        body = {"ready": batcher.running and active, "model_loaded": True,
                "provider": embedder.provider, "requested_provider": embedder.requested,
                "provider_active": active, "batcher_running": batcher.running}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        info = embedder.info
        return {"model": model, "image_size": list(info.image_size), "resize": info.resize,
                "feature_dim": info.feature_dim, "input_format": info.input_format,
                "provider": embedder.provider, "device": embedder.device, "info": info.as_dict(),
                "index": None if index is None else {"num_items": len(index.ids),
                                                     "name": index.root.name, "search": method},
                "limits": {**dataclasses.asdict(limits),
                           **(dataclasses.asdict(server_limits) if server_limits else {})},
                "auth": api_key is not None,
                "batching": {"max_batch": max_batch, "max_wait_ms": max_wait_ms,
                             "batches": batcher.batches, "images": batcher.images}}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(counters.exposition(), media_type=counters.content_type)

    return app


class RequestMetrics:
    """Prometheus counters of one app (its own registry): requests by route and status, their
    latency, images in flight, and the micro-batcher's batches and images."""

    def __init__(self, batcher: MicroBatcher) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("instdisc_requests", "HTTP requests", ["route", "status"],
                                registry=self.registry)
        self.seconds = Histogram("instdisc_request_seconds", "request latency", ["route"],
                                 registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.pending = Gauge("instdisc_images_pending", "images being decoded or embedded",
                             registry=self.registry)
        Gauge("instdisc_batches", "session runs of the micro-batcher", registry=self.registry
              ).set_function(lambda: batcher.batches)
        Gauge("instdisc_batched_images", "images embedded by the micro-batcher",
              registry=self.registry).set_function(lambda: batcher.images)
        self.model = Gauge("instdisc_model_info", "the served model (value 1)", ["sha256"],
                           registry=self.registry)

    @property
    def content_type(self) -> str:
        from prometheus_client import CONTENT_TYPE_LATEST

        return CONTENT_TYPE_LATEST

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.seconds.labels(route).observe(seconds)


ROUTES = ("/embed", "/search", "/health", "/ready", "/metadata", "/metrics", "/docs",
          "/openapi.json")
OPEN_ROUTES = ("/health",)  # answered without the API key: liveness probes carry none


class Guard:
    """ASGI middleware: the API key (when set) and the request metrics. A missing or wrong key
    is a 401 JSON error and never reaches the app; the key is compared in constant time."""

    def __init__(self, app: Any, api_key: str | None, metrics: RequestMetrics) -> None:
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "other"  # bounded label values
        start, status = time.perf_counter(), 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.expected is not None and path not in OPEN_ROUTES and not hmac.compare_digest(
                    dict(scope["headers"]).get(b"authorization", b""), self.expected):
                denied = JSONResponse({"error": "missing or wrong API key: send "
                                                "'Authorization: Bearer <key>'"}, status_code=401,
                                      headers={"WWW-Authenticate": "Bearer"})
                return await denied(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(route, status, time.perf_counter() - start)


def _add_error_handlers(app: FastAPI, limits: Limits) -> None:
    """Every error leaves as {"error": message} with its status."""

    @app.exception_handler(RequestError)
    async def request_error(_: Request, err: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return JSONResponse({"error": err.message}, status_code=err.status, headers=headers)

    @app.exception_handler(MemoryError)
    async def out_of_memory(request: Request, _: MemoryError) -> JSONResponse:
        log.warning("out of memory on %s %s: answered 503", request.method, request.url.path)
        return JSONResponse({"error": "the server ran out of memory for this request; retry "
                                      "later or send a smaller image"}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(_: Request, err: BodyTooLarge) -> JSONResponse:
        return _too_large(limits.max_body_bytes)

    @app.exception_handler(BodyTimeout)
    async def body_timeout(_: Request, err: BodyTimeout) -> JSONResponse:
        return JSONResponse({"error": f"request body not received within "
                                      f"{limits.body_timeout_s:g} s (--body-timeout)"},
                            status_code=408, headers={"Connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, _: ClientDisconnect) -> Response:
        client = request.client
        log.info("client %s left before its request was read", f"{client.host}:{client.port}"
                 if client else "?")
        return Response(status_code=499)  # nginx's "client closed request"; nobody receives it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return JSONResponse({"error": problems}, status_code=422)


