"""Images in chat requests: fetch, decode once, fit to the encoder, encode (E/PD's "E" leg).

For each ``image_url`` part of a chat request, in order:

1. **Bytes.** A ``data:`` URL (base64) is decoded here; an ``http(s)`` URL is fetched with
   ``--image-fetch-timeout``, ``--image-max-bytes`` and ``--image-max-redirects``, following
   redirects ourselves so every hop is checked. A host that is, or resolves to, a link-local
   address (169.254.0.0/16, fe80::/10: where cloud metadata services live) or a known
   metadata name is refused unless ``--image-allow-link-local``; names are checked in the
   connector's resolver, so the address checked is the address connected to.
2. **Content hash**: sha256 of the bytes. It keys the embedding cache, and the placeholder
   tokens the image occupies in the prompt derive from it (``shared.multimodal``).
3. **Decode once** (Pillow), unless the cache already holds the image: PNG, JPEG or WebP
   only, at most ``--image-max-pixels`` (checked from the header, before any pixel is
   decoded), every pixel decoded so a truncated file or a lying header is caught here. Then
   fitted to the encoder's input as the model was trained (longest side to 224, centred on
   black) and sent as 150 KB of pixels: the message is bounded whatever was uploaded.
4. **Encode** on an image encode worker (least loaded; a worker that fails or dies is
   replaced by another, up to ``--migration-limit`` times), at most once per content hash:
   identical images share one call in flight and then the bounded LRU cache
   (``--image-cache-bytes``). Embeddings are kept as float16, what the LLM request carries.

Every failure names the part (``messages[i].content[j]``) and says what is wrong, as a 400.
Decoding and fitting run on a thread, never on the event loop, and so do base64 and hashing
of anything over 256 KB. Loopback and private addresses may be fetched (a mesh often serves
its own images); only link-local and metadata addresses are refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import io
import ipaddress
import logging
import socket
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import numpy as np
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from proto.multimodal import ImageEncodeOutput, ImageEncodeRequest, Tensor, VisionInfo
from proto.openai import ChatCompletionRequest, RequestError
from services.processor import metrics
from services.processor.dispatch import with_retries, worker_stream
from services.processor.models import ModelRegistry, ServedModel, WorkerPool
from shared.flags import Flag, float_converter, int_converter, parse_bool
from shared.multimodal import from_array, image_hash, to_array
from shared.router import LoadTracker, RouterMode, Selector
from shared.runtime import MeshError, NoInstancesError

__all__ = [
    "IMAGE_FLAGS",
    "EncodedImage",
    "ImageEncoder",
    "ImageLimits",
    "ImagePart",
    "decode_image",
    "fit_image",
    "image_parts",
]

log = logging.getLogger(__name__)

_FORMATS = {"PNG", "JPEG", "WEBP"}
_MIME = {"image/png", "image/jpeg", "image/jpg", "image/webp"}
# Names that serve cloud metadata; refused like their (link-local) addresses.
_METADATA_HOSTS = {"metadata", "metadata.google.internal", "metadata.goog"}
# Metadata services outside the link-local ranges (AWS's IPv6, Alibaba's).
_METADATA_ADDRESSES = {
    ipaddress.ip_address("fd00:ec2::254"),
    ipaddress.ip_address("100.100.100.200"),
}
# What the LLM request carries per embedding value.
WIRE_DTYPE = "float16"


@dataclass(frozen=True)
class ImageLimits:
    max_images: int = 4
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    fetch_timeout: float = 10.0
    max_redirects: int = 3
    allow_link_local: bool = False
    cache_bytes: int = 64 * 1024 * 1024


_D = ImageLimits()
IMAGE_FLAGS: tuple[Flag, ...] = (
    Flag("max_images_per_request", int_converter(0), _D.max_images, "N",
         "most image_url parts one chat request may carry (each image's embeddings travel "
         "in the request to the LLM worker: 4 fit NATS's default 1 MiB message)"),
    Flag("image_max_bytes", int_converter(1), _D.max_bytes, "BYTES",
         "largest image (encoded file) accepted, from a data: URL or fetched"),
    Flag("image_max_pixels", int_converter(1), _D.max_pixels, "PIXELS",
         "largest image accepted, width x height (read from the header before decoding)"),
    Flag("image_fetch_timeout", float_converter(0.0, strict=True), _D.fetch_timeout,
         "SECONDS", "how long fetching one http(s) image may take, redirects included"),
    Flag("image_max_redirects", int_converter(0), _D.max_redirects, "N",
         "redirects followed when fetching an image"),
    Flag("image_allow_link_local", parse_bool, False, None,
         "fetch images from link-local and cloud metadata addresses (refused by default)"),
    Flag("image_cache_bytes", int_converter(0), _D.cache_bytes, "BYTES",
         "image embeddings kept by content hash, so an image sent again is not encoded "
         "again (0: no cache)"),
)  # fmt: skip


def image_limits(values: dict[str, Any]) -> ImageLimits:
    return ImageLimits(
        max_images=values["max_images_per_request"],
        max_bytes=values["image_max_bytes"],
        max_pixels=values["image_max_pixels"],
        fetch_timeout=values["image_fetch_timeout"],
        max_redirects=values["image_max_redirects"],
        allow_link_local=values["image_allow_link_local"],
        cache_bytes=values["image_cache_bytes"],
    )


@dataclass(frozen=True, slots=True)
class ImagePart:
    where: str  # "messages[i].content[j]"
    url: str


@dataclass(frozen=True, slots=True)
class EncodedImage:
    hash: str
    embedding: Tensor  # tokens x hidden, float16


def image_parts(req: ChatCompletionRequest) -> list[ImagePart]:
    out: list[ImagePart] = []
    for i, message in enumerate(req.messages):
        for j, image in message.image_parts():
            out.append(ImagePart(f"messages[{i}].content[{j}]", image.url))
    return out


def _bad(part: ImagePart, message: str) -> RequestError:
    return RequestError(f"{part.where}: {message}", param=part.where)


# --------------------------------------------------------------------------------------------
# Bytes


def _data_url(part: ImagePart, limits: ImageLimits) -> bytes:
    header, sep, payload = part.url[5:].partition(",")
    if not sep:
        raise _bad(part, "a data: URL needs a ',' before its data")
    fields = [f.strip().lower() for f in header.split(";")]
    if "base64" not in fields[1:]:
        raise _bad(part, "a data: URL must be base64 (data:image/png;base64,...)")
    if fields[0] and fields[0] not in _MIME:
        raise _bad(part, f"data: URL of type {fields[0]!r}; send image/png, jpeg or webp")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise _bad(part, f"the image is larger than {limits.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(part, "the data: URL's base64 is corrupt") from None


class _Refused(OSError):
    pass


def _refused_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local or ip in _METADATA_ADDRESSES


class _GuardedResolver(AbstractResolver):
    """Resolves as aiohttp does, then refuses link-local and metadata addresses."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if not _refused_address(r["host"])]
        if not allowed:
            raise _Refused(f"{host} resolves to a link-local or metadata address")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class ImageFetcher:
    """``http(s)`` images, within the limits (see the module docstring)."""

    def __init__(self, limits: ImageLimits) -> None:
        self.limits = limits
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            resolver = None if self.limits.allow_link_local else _GuardedResolver()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=resolver, limit=64),
                headers={"User-Agent": "sglmesh-processor"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _check_url(self, part: ImagePart, url: str) -> urllib.parse.SplitResult:
        try:
            parsed = urllib.parse.urlsplit(url)
            host = parsed.hostname or ""
        except ValueError as exc:
            raise _bad(part, f"invalid image URL: {exc}") from None
        if parsed.scheme not in ("http", "https") or not host:
            raise _bad(part, "an image URL must be data:, http:// or https://")
        if not self.limits.allow_link_local and (
            host.lower().rstrip(".") in _METADATA_HOSTS or _refused_address(host)
        ):
            raise _bad(part, f"refused to fetch from {host}: a link-local or metadata address")
        return parsed

    async def fetch(self, part: ImagePart) -> bytes:
        limits = self.limits
        try:
            async with asyncio.timeout(limits.fetch_timeout):
                return await self._fetch(part)
        except TimeoutError:
            raise _bad(part, f"fetching the image took over {limits.fetch_timeout:g} s") from None

    async def _fetch(self, part: ImagePart) -> bytes:
        limits = self.limits
        url = part.url
        for _hop in range(limits.max_redirects + 1):
            self._check_url(part, url)
            try:
                async with self._client().get(url, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308):
                        location = resp.headers.get("Location")
                        if not location:
                            raise _bad(part, f"HTTP {resp.status} redirect without a Location")
                        url = urllib.parse.urljoin(url, location)
                        continue
                    if resp.status != 200:
                        raise _bad(part, f"fetching the image answered HTTP {resp.status}")
                    if (resp.content_length or 0) > limits.max_bytes:
                        raise _bad(part, f"the image is larger than {limits.max_bytes} bytes")
                    body = bytearray()
                    async for chunk in resp.content.iter_chunked(64 * 1024):
                        body += chunk
                        if len(body) > limits.max_bytes:
                            raise _bad(part, f"the image is larger than {limits.max_bytes} bytes")
                    return bytes(body)
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, _Refused):
                    raise _bad(part, f"refused to fetch the image: {exc.os_error}") from None
                raise _bad(part, f"cannot fetch the image: {exc.os_error}") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise _bad(part, f"cannot fetch the image: {exc}") from None
        raise _bad(part, f"fetching the image took more than {limits.max_redirects} redirects")


# --------------------------------------------------------------------------------------------
# Pixels


def decode_image(data: bytes, max_pixels: int) -> Any:
    """The image as a decoded RGB ``PIL.Image``; ValueError says why it is refused."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=sorted(_FORMATS))
    except UnidentifiedImageError:
        raise ValueError("not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:
        raise ValueError(f"the image has more than {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"the image is corrupt: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError("the image has no pixels")
    if width * height > max_pixels:
        raise ValueError(f"the image is {width}x{height}, more than {max_pixels} pixels")
    try:
        image.load()  # every pixel: a truncated file or a lying header fails here
        return image.convert("RGB")
    except Exception as exc:  # Pillow raises many kinds for broken files
        raise ValueError(f"the image is corrupt: {exc}") from None


def fit_image(image: Any, size: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Longest side to ``size`` (area-averaged when shrinking), centred on a black square:
    the encoder's input, as uint8 H x W x 3."""
    from PIL import Image

    width, height = image.size
    scale = size / max(width, height)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new != (width, height):
        method = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
        image = image.resize(new, method)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image, ((size - new[0]) // 2, (size - new[1]) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def _pixels(data: bytes, limits: ImageLimits, size: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return fit_image(decode_image(data, limits.max_pixels), size)


# --------------------------------------------------------------------------------------------
# Encoding


class _Cache:
    """Embeddings by content hash, least recently used first out, bounded in bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self._items: collections.OrderedDict[str, Tensor] = collections.OrderedDict()

    def get(self, key: str) -> Tensor | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, key: str, value: Tensor) -> None:
        if len(value.data) > self.capacity or key in self._items:
            return
        self._items[key] = value
        self.size += len(value.data)
        while self.size > self.capacity:
            _, old = self._items.popitem(last=False)
            self.size -= len(old.data)


# Larger inputs are base64-decoded and hashed on a thread: a 16 MB image costs tens of ms.
_ON_LOOP_BYTES = 256 * 1024
T = TypeVar("T")


async def _off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    if size <= _ON_LOOP_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def _encoder_name(pool: WorkerPool) -> str:
    return next((card.name for card in pool.cards.values()), "")


class ImageEncoder:
    """Bytes to embeddings for a chat request's images (see the module docstring)."""

    def __init__(self, registry: ModelRegistry, limits: ImageLimits, *, migration_limit: int):
        self.registry = registry
        self.limits = limits
        self.migration_limit = migration_limit
        self.fetcher = ImageFetcher(limits)
        self.cache = _Cache(limits.cache_bytes)
        self.tracker = LoadTracker()
        self._selector = Selector(RouterMode.LEAST_LOADED, self.tracker)
        self._inflight: dict[str, asyncio.Future[Tensor]] = {}
        self.encoded = 0  # encode calls made (tests, bench)

    async def close(self) -> None:
        await self.fetcher.close()

    def check(self, model: ServedModel, parts: Sequence[ImagePart]) -> None:
        """Refuse before any work: images for a text-only model, or too many."""
        if not parts:
            return
        if not all(card.accepts_images for card in model.cards):
            raise RequestError(
                f"Model {model.name!r} is a text-only model: it does not accept images "
                f"({parts[0].where} is an image_url part)",
                param=parts[0].where,
            )
        if len(parts) > self.limits.max_images:
            raise RequestError(
                f"{len(parts)} images in one request; at most {self.limits.max_images} are "
                "accepted (--max-images-per-request)",
                param="messages",
            )

    async def encode_all(self, parts: Sequence[ImagePart]) -> list[EncodedImage]:
        if not parts:
            return []
        pool, vision = self._encoder()
        return list(await asyncio.gather(*(self._one(part, pool, vision) for part in parts)))

    def _encoder(self) -> tuple[WorkerPool, VisionInfo]:
        found = self.registry.image_encoder()
        if found is None:
            raise RequestError(
                "no image encode worker is serving: start one with "
                "`sglmesh worker --multimodal-encode-worker`",
                status=503,
            )
        return found

    async def _one(self, part: ImagePart, pool: WorkerPool, vision: VisionInfo) -> EncodedImage:
        if part.url.startswith("data:"):
            data = await _off_loop(len(part.url), _data_url, part, self.limits)
        elif part.url.startswith(("http://", "https://")):
            data = await self.fetcher.fetch(part)
        else:
            raise _bad(part, "an image URL must be data:, http:// or https://")
        key = await _off_loop(len(data), image_hash, data)
        # Embeddings belong to the encoder that made them: another encoder model, another key.
        slot = f"{_encoder_name(pool)}/{key}"
        cached = self.cache.get(slot)
        if cached is not None:
            metrics.image_cache.labels("hit").inc()
            return EncodedImage(key, cached)
        pending = self._inflight.get(slot)
        if pending is not None:
            metrics.image_cache.labels("shared").inc()
            return EncodedImage(key, await asyncio.shield(pending))
        metrics.image_cache.labels("miss").inc()
        future: asyncio.Future[Tensor] = asyncio.get_running_loop().create_future()
        self._inflight[slot] = future
        try:
            try:
                pixels = await asyncio.to_thread(_pixels, data, self.limits, vision.image_size)
            except ValueError as exc:
                raise _bad(part, str(exc)) from None
            embedding = await self._encode(key, pixels)
            self.cache.put(slot, embedding)
            future.set_result(embedding)
            return EncodedImage(key, embedding)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # retrieved: sharers get it, nobody else must
            raise
        finally:
            self._inflight.pop(slot, None)

    async def _encode(self, key: str, pixels: np.ndarray[Any, Any]) -> Tensor:
        request = ImageEncodeRequest(hash=key, pixels=from_array(pixels))

        async def send(excluded: set[int]) -> Tensor:
            found = self.registry.image_encoder()
            if found is None:
                raise NoInstancesError("no image encode workers")
            return await self._send(found[0], request, excluded)

        return await with_retries(
            send, limit=self.migration_limit, label="image-encode", what="image encode"
        )

    async def _send(
        self, pool: WorkerPool, request: ImageEncodeRequest, excluded: set[int]
    ) -> Tensor:
        candidates = pool.candidates()
        if not candidates:
            raise NoInstancesError("no live image encode workers")
        chosen = self._selector.select(candidates, excluded)
        iid = chosen.instance_id
        active = self.tracker.begin(iid, 1, 1)
        async with worker_stream(pool, iid, request, ImageEncodeOutput, excluded, active) as stream:
            async for out in stream:
                if out.hash != request.hash or len(out.embedding.shape) != 2:
                    raise MeshError(f"image encode worker {iid:x} answered another image")
                self.encoded += 1
                return from_array(to_array(out.embedding), WIRE_DTYPE)
            raise MeshError(f"image encode worker {iid:x} answered nothing")
