"""Model files through the mesh: a processor that cannot read the workers' model directory
serves chat from the tokenizer and template the worker published (``shared/model_files.py``),
fetches a changed model again, and refuses files that do not match their hash.

Real processes on the session's NATS and etcd: ``sglmesh worker --engine sim`` and
``sglmesh processor`` with ``--model-root`` naming an empty directory, so the only way to the
model's files is through etcd.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from proto.discovery import ModelCard, WorkerType, model_key
from services.processor.args import parse_processor_args
from shared.infra import EtcdServer, NatsServer
from shared.model import make_test_tokenizer
from shared.model_files import files_sum, publish_model_files
from tests.integration.mesh import make_config, runtime
from tests.integration.processor_mesh import Processor, mesh

MODEL = "tiny"
CHANGED_TEMPLATE = "{% for m in messages %}hello world hello world {{ m['content'] }}{% endfor %}"


async def _chat(p: Processor, model: str = MODEL) -> tuple[int, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "tell a story"}],
            "max_tokens": 4}  # fmt: skip
    url = f"{p.v1}/chat/completions"
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


def _fetched_dirs(cache: Path) -> list[Path]:
    return sorted((cache / "mesh").iterdir()) if (cache / "mesh").is_dir() else []


async def test_a_processor_without_the_model_directory_serves_and_refetches_a_changed_model(
    nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    model = make_test_tokenizer(tmp_path / "models" / "tiny")
    empty, cache = tmp_path / "empty", tmp_path / "cache"
    empty.mkdir()
    async with mesh(nats_server, etcd_server, tmp_path / "logs") as m:
        # Its only model root is empty: the worker's paths are refused, never read.
        remote = m.add_processor("--model-root", str(empty), "--model-cache-dir", str(cache))
        # This one has the model on its disk, under its roots: it reads it there.
        local_cache = tmp_path / "local-cache"
        local = m.add_processor(
            "--model-root", str(tmp_path / "models"), "--model-cache-dir", str(local_cache)
        )
        (first,) = await m.add_workers(model, ("--sim-output-len-mean", "4"), served=MODEL)
        await remote.wait_model(MODEL)
        await local.wait_model(MODEL)
        status, body = await _chat(remote)
        assert status == 200, (body, remote.output())
        before = body["usage"]["prompt_tokens"]
        (fetched,) = _fetched_dirs(cache)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (fetched / name).read_bytes() == (model / name).read_bytes()
        assert "model files fetched through the mesh" in remote.output(20000)
        status, body = await _chat(local)
        assert status == 200 and body["usage"]["prompt_tokens"] == before, body
        assert not local_cache.exists(), "a processor with the files on disk fetched them"

        # The model changes: a new chat template, so new hashes. The processor must load the
        # new files, not keep serving with the old ones.
        changed = tmp_path / "models" / "tiny2"
        shutil.copytree(model, changed)
        (changed / "chat_template.jinja").write_text(CHANGED_TEMPLATE)
        await m.add_workers(changed, ("--sim-output-len-mean", "4"), served=MODEL)
        first.stop()
        deadline = time.monotonic() + 30
        while len(_fetched_dirs(cache)) < 2:
            assert time.monotonic() < deadline, remote.output()
            await asyncio.sleep(0.1)
        while True:
            status, body = await _chat(remote)
            if status == 200 and body["usage"]["prompt_tokens"] != before:
                break
            assert time.monotonic() < deadline, (status, body, remote.output())
            await asyncio.sleep(0.2)
        new = next(d for d in _fetched_dirs(cache) if d != fetched)
        assert (new / "chat_template.jinja").read_text() == CHANGED_TEMPLATE


async def test_files_that_do_not_match_their_hash_are_refused(
    nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    model = make_test_tokenizer(tmp_path / "tiny")
    empty, cache = tmp_path / "empty", tmp_path / "cache"
    empty.mkdir()
    async with mesh(nats_server, etcd_server, tmp_path / "logs") as m:
        p = m.add_processor("--model-root", str(empty), "--model-cache-dir", str(cache))
        await p.wait_live()
        ns = m.cfg.namespace
        async with runtime(make_config(nats_server, etcd_server, namespace=ns)) as rt:
            sources = [(n, model / n) for n in ("tokenizer.json", "tokenizer_config.json")]
            files = await publish_model_files(rt.etcd.client, ns, sources)
            # Someone with write access to etcd swaps the tokenizer's bytes under its hash.
            tokenizer = next(f for f in files if f.name == "tokenizer.json")
            forged = zlib.compress(b'{"version": "1.0", "model": {"type": "forged"}}')
            await rt.etcd.client.put(f"/{ns}/files/{tokenizer.sha256}/0000".encode(), forged)
            await rt.etcd.client.put(f"/{ns}/files/{tokenizer.sha256}".encode(), b"1")
            card = ModelCard(
                name=MODEL,
                model_path=str(model),
                worker_type=WorkerType.AGGREGATED,
                instance_id=0xF11E,
                endpoint=f"{ns}.backend.generate",
                files=files,
                mdc_sum=files_sum(files),
            )
            await rt.put_registered(model_key(ns, MODEL, 0xF11E), msgspec.msgpack.encode(card))
            deadline = time.monotonic() + 15
            while True:
                status, body = await _chat(p)
                if status == 503 and "cannot be served" in json.dumps(body):
                    break
                assert time.monotonic() < deadline, (status, body, p.output())
                await asyncio.sleep(0.2)
        assert "do not match the model card's SHA-256" in p.output(20000)
        assert not any((d / "tokenizer.json").exists() for d in _fetched_dirs(cache))
        assert str(model) not in json.dumps(body), body


def test_a_cache_dir_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit) as exc:
        parse_processor_args(["--model-cache-dir", str(afile)], env={})
    assert exc.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--model-cache-dir" in line and "not a directory" in line, line
