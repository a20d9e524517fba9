"""The HTTP API and the search page: a thin FastAPI layer over a loaded `Searcher`.

Errors are JSON `{"detail": "<one line>"}`; bad input is a 4xx, never a 500 or a traceback.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime, and
# those made inside `create_app` refer to its local limits.
import contextlib
import functools
import gc
import json
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Optional, Union

import anyio
import anyio.to_thread
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, StringConstraints, ValidationError
from starlette.datastructures import UploadFile

from dual_encoder import files
from dual_encoder.classify import TEMPLATES, ZeroShotClassifier
from dual_encoder.config import DataConfig, ServeConfig
from dual_encoder.errors import DualEncoderError
from dual_encoder.index.errors import QueryError, QueryImageError, UnknownItemError
from dual_encoder.index.items import Item
from dual_encoder.serve.batching import QueryBatcher
from dual_encoder.serve.images import (
    THUMBNAIL_MEDIA_TYPE,
    ByteLRUCache,
    ImageFile,
    ImageTimeoutError,
    UnreadableImageError,
    read_image_file,
    thumbnail_of,
)
from dual_encoder.serve.limits import BodyLimitMiddleware, too_large_message

STATIC_DIR = Path(__file__).parent / "static"
MAX_BATCH_QUERIES = 64  # queries in one POST: bounds one request's text-tower batch and response size
THUMBNAIL_CACHE_BYTES = 64 << 20
# The file under an id can change after indexing: browsers revalidate every time, and the ETag (a hash of
# the bytes served) makes an unchanged image a cheap 304.
IMAGE_CACHE_CONTROL = "no-cache"
FILE_TIMEOUT_SECONDS = 10.0  # reading one image file (and making its thumbnail)
FILE_THREADS = 8  # image reads in flight; separate from the threads that run searches
_ITEM_ID = re.compile(r"[0-9]{1,18}")  # int64 range: anything else cannot be an id
# Image queries (decode, resize, image tower) running at once: each may hold a 64-megapixel image in memory.
IMAGE_QUERY_THREADS = 2
MAX_FORM_FIELD_BYTES = 4096  # a multipart field other than the image (q, k, like, weights)
MAX_UPLOAD_NAME_CHARS = 200
UPLOAD_FIELDS = ("image", "q", "k", "like", "text_weight", "image_weight", "like_weight")

# Request errors and their status; any other `DualEncoderError` is a 400.
ERROR_STATUS: dict[type[Exception], int] = {
    QueryImageError: 400,  # refined by its reason: IMAGE_REFUSAL_STATUS
    QueryError: 400,
    UnknownItemError: 404,
    ImageTimeoutError: 504,
    UnreadableImageError: 404,
    DualEncoderError: 400,
}

# Why an uploaded query image was refused -> status: too large 413, not an image 415, else (corrupt) 400.
IMAGE_REFUSAL_STATUS = {files.Refused.TOO_LARGE: 413, files.Refused.NOT_IMAGE: 415}

logger = logging.getLogger(__name__)


class HitOut(BaseModel):
    rank: int
    id: int
    score: float
    caption: Optional[str]
    image_url: str
    thumbnail_url: str


class SearchOut(BaseModel):
    query: Optional[str]
    normalized_query: Optional[str]
    image: Optional[str] = Field(None, description="The uploaded image's file name (image queries only).")
    like: Optional[int] = Field(None, description="The item searched like (more-like-this queries only).")
    weights: Optional[dict[str, float]] = Field(None, description="Each part's weight (mixes only).")
    hits: list[HitOut]


def create_app(
    searcher,
    serve_config: ServeConfig = ServeConfig(),
    *,
    max_batch: int = 32,
    max_image_pixels: int = DataConfig.max_image_pixels,
) -> FastAPI:
    """The FastAPI app serving `searcher`: the JSON API under `/api`, the search page at `/`.

    Args:
        searcher: a loaded `dual_encoder.search.Searcher` (model and index load once, before this).
        serve_config: request limits (query length, k, body bytes), the k of a query that names none
            (`default_k`, also the page's), and thumbnail size.
        max_image_pixels: indexed images whose header declares more pixels are not served or thumbnailed.
        max_batch: most concurrent `GET /api/search` queries merged into one text-tower call; 1 turns
            merging off (queries are then searched one at a time, in arrival order).
    """
    batcher = QueryBatcher(lambda queries, k: searcher.search(queries, k=k), max_batch=max_batch)
    thumbnails = ByteLRUCache(THUMBNAIL_CACHE_BYTES)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="dual_encoder image search",
        summary="Natural-language search over an image index.",
        lifespan=lifespan,
    )
    _install_error_handlers(app)

    QueryText = Annotated[str, StringConstraints(max_length=serve_config.max_query_chars)]
    K = Annotated[int, Field(ge=1, le=serve_config.max_k)]
    default_k = min(serve_config.default_k, serve_config.max_k)

    Weight = Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)]
    ItemId = Annotated[int, Field(ge=0)]

    class SearchBatch(BaseModel):
        queries: list[QueryText] = Field(min_length=1, max_length=MAX_BATCH_QUERIES)
        k: K = default_k

    class LikeQuery(BaseModel):
        """More like an indexed item, optionally mixed with a text."""

        like: ItemId
        q: Optional[QueryText] = None
        k: K = default_k
        text_weight: Weight = 1.0
        like_weight: Weight = 1.0

    class ImageQuery(LikeQuery):
        """The fields of a multipart image search besides the file."""

        like: Optional[ItemId] = None
        image_weight: Weight = 1.0

    image_threads = anyio.CapacityLimiter(IMAGE_QUERY_THREADS)

    async def search_one(k: int, **query) -> dict[str, Any]:
        """One image / item / mixed query, off the event loop (the text batcher serves plain text)."""
        search = functools.partial(searcher.search, k=k, **query)
        return _result_json(await anyio.to_thread.run_sync(search, limiter=image_threads), k)

    @app.get("/api/search", response_model=SearchOut, response_model_exclude_unset=True)
    async def search(
        q: Annotated[
            Optional[str], Query(max_length=serve_config.max_query_chars, description="What to look for.")
        ] = None,
        k: Annotated[int, Query(ge=1, le=serve_config.max_k, description="How many results.")] = default_k,
        like: Annotated[Optional[int], Query(ge=0, description="More like this indexed item (its id).")] = None,
        text_weight: Annotated[float, Query(ge=0, le=1000, description="Weight of q when mixed with like.")] = 1.0,
        like_weight: Annotated[float, Query(ge=0, le=1000, description="Weight of like when mixed with q.")] = 1.0,
    ) -> JSONResponse:
        if like is not None:
            return JSONResponse(await search_one(k, query=q, like=like, text_weight=text_weight, like_weight=like_weight))
        if q is None:
            return JSONResponse({"detail": "q: Field required (or like=ID: more like an indexed item)"}, 422)
        result = await batcher.search(q, k)
        # A response object skips re-validating what `_result_json` built (the hot path under load);
        # `response_model` still documents the shape.
        return JSONResponse(_result_json(result, k))

    @app.post(
        "/api/search",
        response_model=Union[list[SearchOut], SearchOut],
        response_model_exclude_unset=True,
        openapi_extra=_post_search_openapi(SearchBatch, LikeQuery),
    )
    async def search_post(request: Request) -> Any:
        """JSON `{"queries": [...], "k"}`: several texts in one text-tower call, one result per query, in order.
        JSON `{"like": ID, "q"?, "k"?, "text_weight"?, "like_weight"?}`: more like an indexed item, one result.
        `multipart/form-data` with an `image` file (and optionally `q`, `like`, `k` and the weights): search by
        the image, one result."""
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return await search_by_upload(request)
        payload = _json_body(await request.body())
        if isinstance(payload, dict) and "like" in payload and "queries" not in payload:
            query = _validated(LikeQuery, payload)
            return await search_one(
                query.k, query=query.q, like=query.like, text_weight=query.text_weight, like_weight=query.like_weight
            )
        batch = _validated(SearchBatch, payload)
        results = await anyio.to_thread.run_sync(functools.partial(searcher.search, batch.queries, k=batch.k))
        return [_result_json(result, batch.k) for result in results]

    async def search_by_upload(request: Request) -> dict[str, Any]:
        async with request.form(max_files=1, max_fields=len(UPLOAD_FIELDS), max_part_size=MAX_FORM_FIELD_BYTES) as form:
            unknown = sorted(set(form) - set(UPLOAD_FIELDS))
            if unknown:
                raise _invalid(unknown[0], f"unknown field (expected {', '.join(UPLOAD_FIELDS)})")
            upload = form.get("image")
            if upload is not None and not isinstance(upload, UploadFile):
                raise _invalid("image", "must be a file")
            fields = {name: value for name, value in form.items() if name != "image"}
            if any(not isinstance(value, str) for value in fields.values()):
                raise _invalid("image", "only the image may be a file")
            query = _validated(ImageQuery, fields)
            if upload is None and query.like is None:
                raise _invalid("image", "Field required (an image file, or like=ID)")
            data = None if upload is None else await upload.read(serve_config.max_upload_bytes + 1)
            name = None if upload is None else _upload_name(upload)
        if data is not None and len(data) > serve_config.max_upload_bytes:
            raise QueryImageError(files.Refused.TOO_LARGE, too_large_message(serve_config.max_upload_bytes))
        if data is not None:
            try:  # the server's pixel limit, from the header, before any decoder or thread is involved
                files.open_image(data, max_image_pixels)
            except files.FileRefusedError as refused:
                raise QueryImageError.refused(name, refused) from None
        return await search_one(
            query.k, query=query.q, image=data, like=query.like, image_name=name,
            text_weight=query.text_weight, image_weight=query.image_weight, like_weight=query.like_weight,
        )  # fmt: skip

    file_threads = anyio.CapacityLimiter(FILE_THREADS)

    async def in_file_thread(function, *args):
        """Run file I/O off the event loop, on its own threads, with a deadline: a slow or odd file cannot
        stall other requests (`/healthz` included)."""
        try:
            with anyio.fail_after(FILE_TIMEOUT_SECONDS):
                return await anyio.to_thread.run_sync(function, *args, abandon_on_cancel=True, limiter=file_threads)
        except TimeoutError:
            raise ImageTimeoutError("reading the image file of this item timed out") from None

    async def read_item_image(item_id: str) -> ImageFile:
        item = _find_item(searcher, item_id)
        return await in_file_thread(read_image_file, item.path, max_image_pixels)

    @app.api_route("/api/images/{item_id}", methods=["GET", "HEAD"])
    async def image(item_id: str, request: Request) -> Response:
        """The image file as it is now; its ETag is the sha256 of exactly these bytes."""
        found = await read_item_image(item_id)
        etag = f'"{found.sha256}"'
        if _matches(request, etag):
            return _not_modified(etag)
        return _reply(request, found.data, found.media_type, etag)

    @app.api_route("/api/thumbnails/{item_id}", methods=["GET", "HEAD"])
    async def thumbnail(item_id: str, request: Request) -> Response:
        found = await read_item_image(item_id)
        etag = f'"{found.sha256}-{serve_config.thumbnail_size}"'
        if _matches(request, etag):
            return _not_modified(etag)
        body = thumbnails.get(found.sha256)
        if body is None:
            body = await in_file_thread(thumbnail_of, found.data, serve_config.thumbnail_size, max_image_pixels)
            thumbnails.put(found.sha256, body)
        return _reply(request, body, THUMBNAIL_MEDIA_TYPE, etag)

    class ClassifyIn(BaseModel):
        labels: Union[list[str], str] = Field(description='Labels, as a list or "cat,dog,…".')
        templates: Union[list[str], str] = Field("simple", description="simple, imagenet, or a list with '{}'.")
        k: K = 5
        id: Optional[int] = Field(None, description="An indexed item to classify (its stored embedding).")
        image_base64: Optional[str] = Field(None, description="An uploaded image (PNG/JPEG/… bytes, base64).")

    @app.post("/api/classify")
    def classify(body: ClassifyIn) -> dict[str, Any]:
        """Zero-shot classification of one image (indexed id or upload) among `labels`: top-k with scores."""
        if (body.id is None) == (body.image_base64 is None):
            raise ClassifyInputError("give exactly one of 'id' (an indexed item) and 'image_base64' (an upload)")
        templates = body.templates.split("\n") if isinstance(body.templates, str) and "{}" in body.templates else body.templates
        if isinstance(templates, str) and templates not in TEMPLATES:
            raise ClassifyInputError(f"templates must be one of {sorted(TEMPLATES)} or a list of strings with '{{}}'")
        classifier = ZeroShotClassifier(searcher.model, body.labels, templates)
        if body.id is not None:
            item = _find_item(searcher, str(body.id))
            embedding = searcher.index.embeddings[searcher.index.items.row_of(item.id)][None]
            path = str(item.id)
        else:
            embedding = encode_uploaded_image(searcher.model, body.image_base64, max_image_pixels)
            path = "upload"
        prediction = classifier.classify_embeddings(embedding, [path], k=body.k)[0]
        return {"id": body.id, **{key: value for key, value in prediction.to_dict().items() if key != "path"}}

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        """The index being searched and the request limits."""
        limits = {
            "default_k": default_k,
            "max_k": serve_config.max_k,
            "max_query_chars": serve_config.max_query_chars,
            "max_upload_bytes": serve_config.max_upload_bytes,
            "max_image_pixels": max_image_pixels,
        }
        return {"index": searcher.info(), "limits": limits}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:  # on the event loop: never queued behind worker threads
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:  # the page names /static/favicon.svg; this answers clients that ask anyway
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=serve_config.max_request_bytes,
        upload_bytes=max(serve_config.max_upload_bytes, serve_config.max_request_bytes),
        upload_paths=("/api/search",),
    )
    return app


def run_server(
    index_dir: Union[str, Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    model_dir: Optional[Union[str, Path]] = None,
    serve_config: ServeConfig = ServeConfig(),
    *,
    max_batch: int = 32,
    max_image_pixels: int = DataConfig.max_image_pixels,
    access_log: bool = False,
) -> None:
    """Load the index and its model once, then serve the API and page with uvicorn until interrupted.

    Args:
        index_dir: the index to search.
        host: the interface to bind; 127.0.0.1 keeps the server private to this machine ("0.0.0.0" opens
            it to the network).
        port: the TCP port.
        model_dir: the model to embed queries with; by default the one the index records.
        serve_config: request limits and thumbnail size (its host and port are not used: pass them above).
        max_batch, max_image_pixels: see `create_app`.
        access_log: log one line per request (off by default: a busy server would write hundreds a second).
    """
    import uvicorn

    from dual_encoder.search import Searcher

    searcher = Searcher.load(index_dir, model_dir=model_dir, max_image_pixels=max_image_pixels)
    app = create_app(searcher, serve_config, max_batch=max_batch, max_image_pixels=max_image_pixels)
    # TensorFlow, the model and the item table are ~400k objects that live as long as the server; a full
    # garbage collection walks them all (~185 ms on 2 cores), stalling every request in flight. Frozen,
    # the collector skips them.
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info")


# -- helpers ----------------------------------------------------------------------------------------


class ClassifyInputError(DualEncoderError, ValueError):
    """A classify request without exactly one image, or with an unreadable one."""


def encode_uploaded_image(model, data_base64: str, max_pixels: int):
    """Base64 image bytes -> [1, D] embedding, decoded and resized as the index pipeline does."""
    import base64
    import binascii

    import numpy as np
    import tensorflow as tf

    from dual_encoder.data.pipeline import image_input, resize_image
    from dual_encoder.images import decode
    from dual_encoder.models.compiled import compiled

    try:
        data = base64.b64decode(data_base64, validate=True)
    except (binascii.Error, ValueError):
        raise ClassifyInputError("image_base64 is not valid base64") from None
    try:
        image = decode(data, max_pixels)
    except DualEncoderError:
        raise
    except Exception:  # Pillow raises many kinds for bytes that are not an image
        raise ClassifyInputError("image_base64 does not hold a readable image") from None
    pixels = resize_image(tf.constant(np.asarray(image.convert("RGB"))), image_input(model))[None]
    return np.asarray(compiled(model, "encode_image")(pixels))


def _links(hit) -> dict[str, str]:
    return {"image_url": f"/api/images/{hit.id}", "thumbnail_url": f"/api/thumbnails/{hit.id}"}


def _result_json(result, k: int) -> dict[str, Any]:
    # A micro-batch searches with the largest k asked in it: each caller gets only its own k.
    return result.to_dict(k, paths=False, links=_links)


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as error:  # not JSON, or not UTF-8
        raise _invalid("body", f"not valid JSON ({error})") from None


def _validated(model: type[BaseModel], values: Any) -> Any:
    """`values` as a `model`, or a 422 naming the field, as FastAPI's own validation says it."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None


def _invalid(field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": "value_error"}])


def _upload_name(upload: UploadFile) -> str:
    """The uploaded file's own name (no client folders), for the result and messages."""
    name = os.path.basename((upload.filename or "").replace("\\", "/"))
    return name[:MAX_UPLOAD_NAME_CHARS] or "upload"


def _post_search_openapi(batch: type[BaseModel], like: type[BaseModel]) -> dict[str, Any]:
    """The request bodies `POST /api/search` reads itself (JSON batch or like; multipart image upload)."""
    form = {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "The image to search with."},
            "q": {"type": "string", "description": "A text to mix in."},
            "like": {"type": "integer", "description": "An item to mix in."},
            "k": {"type": "integer"},
            "text_weight": {"type": "number"},
            "image_weight": {"type": "number"},
            "like_weight": {"type": "number"},
        },
    }
    json_body = {"oneOf": [batch.model_json_schema(), like.model_json_schema()]}
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": json_body}, "multipart/form-data": {"schema": form}},
        }
    }


def _find_item(searcher, item_id: str) -> Item:
    """The indexed item with this id; only ids are looked up, so no request text ever reaches a path."""
    items = searcher.index.items
    row = items.row_of(int(item_id)) if _ITEM_ID.fullmatch(item_id) else None
    if row is None:
        raise UnknownItemError(f"no item with id {item_id[:40]!r} in the index")
    return items[row]


def _matches(request: Request, etag: str) -> bool:
    candidates = request.headers.get("if-none-match", "")
    return any(tag.strip() in (etag, "*", f"W/{etag}") for tag in candidates.split(","))


def _reply(request: Request, body: bytes, media: str, etag: str) -> Response:
    """The body, or for HEAD only its headers (with the length the GET would send)."""
    headers = _cache_headers(etag)
    if request.method == "HEAD":
        return Response(headers={**headers, "Content-Length": str(len(body))}, media_type=media)
    return Response(body, media_type=media, headers=headers)


def _cache_headers(etag: str) -> dict[str, str]:
    return {"ETag": etag, "Cache-Control": IMAGE_CACHE_CONTROL}


def _not_modified(etag: str) -> Response:
    return Response(status_code=304, headers=_cache_headers(etag))


def _install_error_handlers(app: FastAPI) -> None:
    async def user_error(_: Request, error: Exception) -> JSONResponse:
        status = next(code for cls, code in ERROR_STATUS.items() if isinstance(error, cls))
        if isinstance(error, QueryImageError):
            status = IMAGE_REFUSAL_STATUS.get(error.reason, status)
        return JSONResponse({"detail": str(error)}, status_code=status)

    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(error)}, status_code=422)

    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        # Last resort: the details go to the server log, never to the client.
        logger.exception("unhandled error serving %s %s", request.method, request.url.path, exc_info=error)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    for error_class in ERROR_STATUS:
        app.add_exception_handler(error_class, user_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, unexpected)


def _validation_message(error: RequestValidationError) -> str:
    """FastAPI's list of validation errors as one line: `k: Input should be less than or equal to 100`."""
    parts = []
    for problem in error.errors():
        where = [str(part) for part in problem.get("loc", ())]  # ("query", "k") or ("body", "queries", 0)
        location = ".".join(where[1:]) or ".".join(where) or "request"
        parts.append(f"{location}: {problem.get('msg', 'invalid value')}")
    return "; ".join(parts)
