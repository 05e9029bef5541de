"""A model's tokenizer, config and chat template files, carried through etcd by their hash.

Why: a processor must tokenize and template exactly as the workers' model does, but it should
not need the workers' model volume. A worker publishes the few small files a processor reads
(``PUBLISHED_FILES``, a few MB) under content-addressed keys, and lists them in its model card
(name, SHA-256, size). A processor anywhere fetches them by hash into a local cache directory,
checks every byte against the hash, and loads the model from there; a changed model has new
hashes, so it is fetched again, and an unchanged one is read from the cache.

Why etcd and not NATS JetStream's object store: measured by ``make bench-model-files``
(``bench/model_files.py``, ``bench/results/model_files.json``) with SmolLM2's five files
(3.5 MB) on loopback, a cold fetch -- what every processor pays -- took 30 ms (median) from
etcd against 275 ms from the object store through nats-py (which reads 128 KiB chunks one
message at a time); publishing, done once per model, took 90 ms (zlib included) against 24
ms. etcd is also every process's discovery store already, with per-role permissions, while
the object store would need JetStream turned on, persistent storage and clustering in every
shipped NATS, and new ``$JS``/``$O`` permissions per role. Compressed, these files fit in a
value or two under etcd's 1.5 MiB request limit (etcd's database grew 0.6 MB per publish).
Files are content-addressed and not leased: workers of one model share them, a key written
once is never rewritten (the marker key is written last and checked first), and an
operator removes old models' files with ``etcdctl del --prefix /<namespace>/files/``.

Layout under ``/<namespace>/files/<sha256>``: the marker's value is the number of chunks;
``.../<sha256>/<index>`` hold the zlib-compressed bytes in chunks of at most ``CHUNK_BYTES``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import aetcd

from proto.discovery import ModelCard, ModelFile

__all__ = [
    "CHUNK_BYTES",
    "MAX_FILE_BYTES",
    "PUBLISHED_FILES",
    "ModelFilesError",
    "cached_directory",
    "card_file_sources",
    "fetch_model_files",
    "file_matches",
    "files_sum",
    "publish_model_files",
    "read_model_files",
]

# What a processor reads from a model directory (services/processor/preprocess.py), and the
# names a card may list: nothing else is ever fetched or written.
PUBLISHED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
    "generation_config.json",
    "chat_template.jinja",
    "custom_chat_template.jinja",  # the worker's --custom-jinja-template, when given
)
CHUNK_BYTES = 1 << 20  # under etcd's default 1.5 MiB request limit, with room for the key
MAX_FILE_BYTES = 64 << 20  # a card naming a larger file is refused, never fetched
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ModelFilesError(RuntimeError):
    """Files could not be published or fetched, or they do not match their hash."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_sum(files: Iterable[ModelFile]) -> str:
    """One hash for a set of files: the cache directory's name, and the card's ``mdc_sum``."""
    lines = sorted(f"{f.name}\0{f.sha256}\0{f.size}\n" for f in files)
    return _sha256("".join(lines).encode())


def _marker(namespace: str, sha: str) -> bytes:
    return f"/{namespace}/files/{sha}".encode()


def _chunk(namespace: str, sha: str, index: int) -> bytes:
    return f"/{namespace}/files/{sha}/{index:04d}".encode()


def card_file_sources(card: ModelCard) -> list[tuple[str, Path]]:
    """Where each of a card's files lies on its worker: the chat template and custom template
    at the card's paths, the rest in the tokenizer directory, else the model directory."""
    tokenizer_dir = Path(card.tokenizer_path or card.model_path).expanduser()
    model_dir = Path(card.model_path).expanduser()
    sources = []
    for name in PUBLISHED_FILES:
        if name == "chat_template.jinja":
            if card.chat_template_path:
                sources.append((name, Path(card.chat_template_path).expanduser()))
        elif name == "custom_chat_template.jinja":
            if card.custom_template_path:
                sources.append((name, Path(card.custom_template_path).expanduser()))
        else:
            first = tokenizer_dir / name
            sources.append((name, first if first.is_file() else model_dir / name))
    return sources


def read_model_files(sources: Sequence[tuple[str, Path]]) -> list[tuple[ModelFile, bytes]]:
    """Read the files to publish: ``(published name, local path)`` pairs; missing ones are
    skipped (a model need not have every file)."""
    out = []
    for name, path in sources:
        if name not in PUBLISHED_FILES:
            raise ModelFilesError(f"{name!r} is not a model file the mesh publishes")
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            continue  # absent, or the model "directory" is one file (an ONNX vision encoder)
        except OSError as exc:
            raise ModelFilesError(f"cannot read {path}: {exc}") from exc
        if len(data) > MAX_FILE_BYTES:
            raise ModelFilesError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
        out.append((ModelFile(name=name, sha256=_sha256(data), size=len(data)), data))
    return out


async def publish_model_files(
    client: aetcd.Client, namespace: str, sources: Sequence[tuple[str, Path]]
) -> list[ModelFile]:
    """Store each file under its hash (unless already there); returns what the card lists."""
    files = await asyncio.to_thread(read_model_files, sources)
    for ref, data in files:
        marker = _marker(namespace, ref.sha256)
        if await client.get(marker) is not None:
            continue  # another worker (or an earlier start) published the same bytes
        packed = await asyncio.to_thread(zlib.compress, data, 6)
        chunks = [packed[i : i + CHUNK_BYTES] for i in range(0, len(packed), CHUNK_BYTES)]
        for index, chunk in enumerate(chunks):
            await client.put(_chunk(namespace, ref.sha256, index), chunk)
        await client.put(marker, str(len(chunks)).encode())
    return [ref for ref, _ in files]


def _check_refs(files: Sequence[ModelFile]) -> None:
    names = set()
    for ref in files:
        if ref.name not in PUBLISHED_FILES:
            raise ModelFilesError(f"the model card lists {ref.name!r}, not a model file")
        if not _SHA256.fullmatch(ref.sha256):
            raise ModelFilesError(f"the model card's hash of {ref.name!r} is not a SHA-256")
        if not 0 <= ref.size <= MAX_FILE_BYTES:
            raise ModelFilesError(f"the model card's {ref.name!r} is too large ({ref.size})")
        if ref.name in names:
            raise ModelFilesError(f"the model card lists {ref.name!r} twice")
        names.add(ref.name)


def file_matches(path: Path, ref: ModelFile) -> bool:
    """Whether ``path`` holds exactly the bytes ``ref`` describes."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return len(data) == ref.size and _sha256(data) == ref.sha256


def cached_directory(cache_dir: Path, files: Sequence[ModelFile]) -> Path:
    """Where :func:`fetch_model_files` puts (and finds) these files."""
    return cache_dir / "mesh" / files_sum(files)


async def _fetch_one(client: aetcd.Client, namespace: str, ref: ModelFile) -> bytes:
    marker = await client.get(_marker(namespace, ref.sha256))
    if marker is None:
        raise ModelFilesError(f"{ref.name} ({ref.sha256[:12]}) is not in the mesh's file store")
    try:
        count = int(marker.value)
    except ValueError:
        raise ModelFilesError(f"{ref.name}: malformed file store entry") from None
    if not 0 < count <= MAX_FILE_BYTES // CHUNK_BYTES + 1:
        raise ModelFilesError(f"{ref.name}: malformed file store entry ({count} chunks)")
    unpack = zlib.decompressobj()
    parts: list[bytes] = []
    have = 0
    for index in range(count):
        got = await client.get(_chunk(namespace, ref.sha256, index))
        if got is None:
            raise ModelFilesError(f"{ref.name}: chunk {index} of {count} is missing")
        # Never inflate more than the card says, whatever the store holds.
        try:
            part = unpack.decompress(got.value, ref.size + 1 - have)
        except zlib.error as exc:
            raise ModelFilesError(f"{ref.name}: corrupt data in the file store: {exc}") from None
        parts.append(part)
        have += len(part)
        if have > ref.size:
            break
    data = b"".join(parts)
    if len(data) != ref.size or _sha256(data) != ref.sha256:
        raise ModelFilesError(
            f"{ref.name}: the fetched bytes do not match the model card's SHA-256 "
            f"{ref.sha256[:12]}...; refused"
        )
    return data


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def fetch_model_files(
    client: aetcd.Client, namespace: str, files: Sequence[ModelFile], cache_dir: Path
) -> tuple[Path, int]:
    """The directory holding ``files``, fetched into ``cache_dir`` unless already cached with
    the right bytes; returns it and how many files were fetched. Nothing that fails its hash
    is ever written."""
    _check_refs(files)
    if not files:
        raise ModelFilesError("the model card lists no model files")
    directory = cached_directory(cache_dir, files)
    fetched = 0
    for ref in files:
        path = directory / ref.name
        if await asyncio.to_thread(file_matches, path, ref):
            continue
        data = await _fetch_one(client, namespace, ref)
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(_write_atomic, path, data)
        fetched += 1
    return directory, fetched
