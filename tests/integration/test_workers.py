"""Worker processes started as a user starts them (`sglmesh worker --engine sim ...`)."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from proto.discovery import ModelCard, models_prefix
from proto.request import BootstrapInfo, PreprocessedRequest, SamplingOptions, StopConditions
from proto.response import EngineOutput
from shared.config import MeshConfig
from shared.infra import EtcdServer, NatsServer, free_port
from shared.model import make_test_tokenizer
from shared.runtime import Client, DistributedRuntime, MeshError
from tests.integration.mesh import ADMIN_HEADERS, ROOT, make_config, mesh_flags, runtime


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_tokenizer(tmp_path_factory.mktemp("model") / "tiny")


class Worker:
    """``python -m sglmesh worker ...`` with its system server on a known port."""

    def __init__(self, cfg: MeshConfig, model: Path, *flags: str, speedup: float = 0) -> None:
        self.system_port = free_port()
        self.args = [
            sys.executable, "-m", "sglmesh", "worker",
            "--engine", "sim",
            "--model-path", str(model),
            "--speedup-ratio", str(speedup),
            "--page-size", "16",
            "--max-total-tokens", "32768",
            *mesh_flags(cfg),
            "--system-host", "127.0.0.1",
            "--system-port", str(self.system_port),
            *flags,
        ]  # fmt: skip
        # Unnamed: the log is gone with the handle, nothing is left in the temp directory.
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=self.log, stderr=self.log)
        self.base = f"http://127.0.0.1:{self.system_port}"

    async def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited {self.proc.returncode}:\n{self.output()}")
                try:
                    async with http.get(f"{self.base}/health") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker not ready:\n{self.output()}")
                await asyncio.sleep(0.1)

    async def get(self, path: str) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession(headers=ADMIN_HEADERS) as http,
            http.get(f"{self.base}{path}") as resp,
        ):
            body = await resp.json() if path != "/metrics" else await resp.text()
            return resp.status, body

    async def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession(headers=ADMIN_HEADERS) as http,
            http.post(f"{self.base}{path}", json=body or {}) as resp,
        ):
            return resp.status, await resp.json()

    async def metric(self, name: str) -> float:
        _, text = await self.get("/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()


async def start(workers: list[Worker], *new: Worker) -> None:
    workers.extend(new)
    await asyncio.gather(*(w.wait_ready() for w in new))


@pytest.fixture
async def mesh(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> AsyncIterator[tuple[MeshConfig, DistributedRuntime]]:
    cfg = make_config(nats_server, etcd_server, graceful_shutdown_grace_period=2.0)
    async with runtime(cfg) as rt:
        yield cfg, rt


def request(prompt: list[int], max_tokens: int, seed: int = 1, **extra: Any) -> PreprocessedRequest:
    return PreprocessedRequest(
        token_ids=prompt,
        stop_conditions=StopConditions(max_tokens=max_tokens, ignore_eos=True),
        sampling_options=SamplingOptions(temperature=0.7, seed=seed),
        **extra,
    )


async def collect(client: Client, req: PreprocessedRequest, **kw: Any) -> list[EngineOutput]:
    stream = await client.generate(req, response_type=EngineOutput, **kw)
    return [chunk async for chunk in stream]


def token_ids(chunks: list[EngineOutput]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def test_aggregated_worker_streams_tokens_with_usage_and_registers_its_model(
    mesh: tuple[MeshConfig, DistributedRuntime], model_dir: Path, workers: list[Worker]
) -> None:
    cfg, rt = mesh
    await start(workers, Worker(cfg, model_dir, "--served-model-name", "tiny,tiny-chat"))
    client = await rt.client("backend", "generate")
    await client.wait_for_instances(1, timeout=10)
    prompt = list(range(100, 140))
    chunks = await collect(client, request(prompt, 12))
    assert len(token_ids(chunks)) == 12
    first, last = chunks[0], chunks[-1]
    assert first.completion_usage is not None and last.completion_usage is not None
    assert last.completion_usage.prompt_tokens == 40
    assert last.completion_usage.completion_tokens == 12
    assert last.completion_usage.total_tokens == 52
    assert last.finish_reason == "length"
    # A repeat of the prompt hits the prefix cache: cached tokens are reported.
    again = await collect(client, request(prompt, 4))
    usage = again[-1].completion_usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens >= 32
    assert token_ids(again) == token_ids(chunks)[:4]  # same seed, same prompt

    # The card follows the instance record: the worker publishes its model files first (to
    # etcd, a few MB), so it may land after the first answers.
    deadline = asyncio.get_running_loop().time() + 10
    while not (kvs := list(await rt.etcd.client.get_prefix(models_prefix(cfg.namespace).encode()))):
        assert asyncio.get_running_loop().time() < deadline, "no model card within 10 s"
        await asyncio.sleep(0.05)
    (card,) = [msgspec.msgpack.decode(kv.value, type=ModelCard) for kv in kvs]
    assert (card.name, card.aliases) == ("tiny", ["tiny-chat"])
    assert card.kv_cache_block_size == 16 and card.runtime_config is not None
    assert card.runtime_config.total_kv_blocks == 32768 // 16
    assert card.endpoint == f"{cfg.namespace}.backend.generate"
    (record,) = client.instances()
    assert record.model == "tiny" and record.worker_type == "aggregated"

    # clear_kv_blocks: the worker is idle, so it flushes.
    clear = await rt.client("backend", "clear_kv_blocks")
    await clear.wait_for_instances(1, timeout=5)
    (answer,) = [c async for c in await clear.generate({})]
    assert answer["status"] == "success", answer


async def test_disaggregated_pair_matches_aggregated(
    mesh: tuple[MeshConfig, DistributedRuntime], model_dir: Path, workers: list[Worker]
) -> None:
    cfg, rt = mesh
    agg_ns = make_config_like(cfg, "agg")
    await start(
        workers,
        Worker(agg_ns, model_dir),
        Worker(cfg, model_dir, "--disaggregation-mode", "prefill"),
        Worker(cfg, model_dir, "--disaggregation-mode", "decode"),
    )
    async with runtime(agg_ns) as agg_rt:
        agg = await agg_rt.client("backend", "generate")
        prefill = await rt.client("prefill", "generate")
        decode = await rt.client("backend", "generate")
        for c in (agg, prefill, decode):
            await c.wait_for_instances(1, timeout=10)
        (prefill_record,) = prefill.instances()
        assert prefill_record.runtime_config is not None
        host = prefill_record.runtime_config.bootstrap_host
        port = prefill_record.runtime_config.bootstrap_port
        assert host and port
        rng = random.Random(3)
        for case in range(3):
            prompt = [rng.randrange(100, 400) for _ in range(rng.randrange(10, 120))]
            expected = token_ids(await collect(agg, request(prompt, 16, seed=case)))
            boot = BootstrapInfo(bootstrap_host=host, bootstrap_port=port,
                                 bootstrap_room=rng.randrange(2**62))  # fmt: skip
            pre, dec = await asyncio.gather(
                collect(prefill, request(prompt, 16, seed=case, bootstrap_info=boot)),
                collect(decode, request(prompt, 16, seed=case, bootstrap_info=boot)),
            )
            assert token_ids(dec) == expected
            assert pre[0].disaggregated_params == {
                "bootstrap_host": host, "bootstrap_port": port,
                "bootstrap_room": boot.bootstrap_room,
            }  # fmt: skip
            assert token_ids(pre) == []  # prefill output tokens are discarded
            assert pre[-1].engine_data is not None and "kv_cache_hit" in pre[-1].engine_data
        # The decode worker insists on bootstrap info.
        with pytest.raises(MeshError) as info:
            await collect(decode, request([1, 2, 3], 4))
        assert info.value.code == "invalid_request"


def make_config_like(cfg: MeshConfig, suffix: str) -> MeshConfig:
    import dataclasses

    return dataclasses.replace(cfg, namespace=f"{cfg.namespace}{suffix}")


@pytest.mark.parametrize("leg", ["aggregated", "decode", "prefill"])
async def test_cancel_mid_stream_frees_the_kv(
    mesh: tuple[MeshConfig, DistributedRuntime], model_dir: Path, workers: list[Worker], leg: str
) -> None:
    cfg, rt = mesh
    if leg == "aggregated":
        await start(workers, Worker(cfg, model_dir, speedup=1))
    else:
        await start(
            workers,
            Worker(cfg, model_dir, "--disaggregation-mode", "prefill", speedup=1),
            Worker(cfg, model_dir, "--disaggregation-mode", "decode", speedup=1),
        )
    backend = await rt.client("backend", "generate")
    await backend.wait_for_instances(1, timeout=10)
    boot: BootstrapInfo | None = None
    prefill: Client | None = None
    if leg != "aggregated":
        prefill = await rt.client("prefill", "generate")
        await prefill.wait_for_instances(1, timeout=10)
        rc = prefill.instances()[0].runtime_config
        assert rc is not None and rc.bootstrap_host and rc.bootstrap_port
        boot = BootstrapInfo(bootstrap_host=rc.bootstrap_host, bootstrap_port=rc.bootstrap_port,
                             bootstrap_room=4242)  # fmt: skip
    prompt = list(range(500, 900))  # 400 tokens
    if leg == "prefill":
        # The decode never comes for this room: the prefill holds its KV while it waits.
        assert prefill is not None
        stream = await prefill.generate(request(prompt, 1, bootstrap_info=boot),
                                        response_type=EngineOutput)  # fmt: skip
        first = await stream.__anext__()
        assert first.disaggregated_params is not None  # the bootstrap chunk came at once
        await asyncio.sleep(0.3)
        worker = workers[0]
    else:
        extra = {"bootstrap_info": boot} if boot else {}
        prefill_task = (
            asyncio.create_task(collect(prefill, request(prompt, 1, bootstrap_info=boot)))
            if prefill is not None
            else None
        )
        stream = await backend.generate(request(prompt, 1500, **extra), response_type=EngineOutput)
        got = 0
        async for chunk in stream:
            got += len(chunk.token_ids)
            if got >= 5:
                break
        if prefill_task is not None:
            await asyncio.wait_for(prefill_task, 10)
        worker = workers[-1]
    assert await worker.metric("sglang:num_used_tokens") >= len(prompt)  # it holds the KV
    await stream.aclose()
    # No KV leak: once the cancel reached the engines, each can flush its whole cache (a flush
    # is refused while any request is still active) and then holds no KV at all.
    for w in workers:
        deadline = time.monotonic() + 5
        while True:
            status, flushed = await w.post("/engine/flush_cache")
            if status == 200:
                break
            assert time.monotonic() < deadline, (flushed, w.output())
            await asyncio.sleep(0.05)
        assert flushed["status"] == "ok", flushed
        assert await w.metric("sglang:num_running_reqs") == 0
        assert await w.metric("sglang:num_used_tokens") == 0, w.output()


async def test_sigterm_under_load_loses_no_request(
    mesh: tuple[MeshConfig, DistributedRuntime], model_dir: Path, workers: list[Worker]
) -> None:
    cfg, rt = mesh
    await start(workers, Worker(cfg, model_dir, speedup=1), Worker(cfg, model_dir, speedup=1))
    client = await rt.client("backend", "generate")
    await client.wait_for_instances(2, timeout=10)
    outcomes: list[str] = []

    async def one(i: int) -> None:
        try:
            async with asyncio.timeout(30):
                chunks = await collect(client, request(list(range(i, i + 50)), 60 + i % 40))
            assert len(token_ids(chunks)) == 60 + i % 40, "incomplete stream"
            outcomes.append("ok")
        except MeshError as exc:
            assert exc.retryable, exc
            outcomes.append(exc.code)

    tasks = [asyncio.create_task(one(i)) for i in range(40)]
    await asyncio.sleep(0.3)
    victim = workers[0]
    victim.proc.send_signal(signal.SIGTERM)
    await asyncio.gather(*tasks)
    assert len(outcomes) == 40  # every request ended, one way or the other
    assert outcomes.count("ok") >= 20
    assert set(outcomes) <= {"ok", "shutting_down"}
    assert await asyncio.to_thread(victim.proc.wait, 20) == 0
    # New requests go to the survivor.
    await client.wait_for_instances(1, timeout=5)
    assert len(client.instances()) == 1
    assert len(token_ids(await collect(client, request([1, 2, 3], 5)))) == 5


async def test_paused_worker_is_not_ready_and_out_of_discovery(
    mesh: tuple[MeshConfig, DistributedRuntime], model_dir: Path, workers: list[Worker]
) -> None:
    cfg, rt = mesh
    await start(workers, Worker(cfg, model_dir))
    worker = workers[0]
    client = await rt.client("backend", "generate")
    await client.wait_for_instances(1, timeout=10)
    status, body = await worker.post("/engine/pause_generation")
    assert status == 200, body
    # The deletion reaches the watcher through etcd's watch stream: seconds on a loaded CI box.
    await client._watcher.wait_for(lambda _: not client.instances(), timeout=15)
    status, _ = await worker.get("/health")
    assert status == 503
    status, body = await worker.post("/engine/continue_generation")
    assert status == 200, body
    await client.wait_for_instances(1, timeout=15)
    status, _ = await worker.get("/health")
    assert status == 200
    assert len(token_ids(await collect(client, request([5, 6, 7], 3)))) == 3


def test_nats_down_at_start_is_one_line_with_a_hint(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sglmesh", "worker", "--engine", "sim",
         "--model-path", str(tmp_path), "--nats-url", "nats://127.0.0.1:1", "--log-format",
         "text"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) <= 3, lines  # it was 40 JSON lines over 10 s
    assert "cannot reach NATS" in lines[-1] and "sglmesh infra up" in lines[-1], lines


def test_bad_flags_fail_at_once_with_one_clear_line(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sglmesh", "worker", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    missing = run("--engine", "sim", "--model-path", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert "--model-path" in missing.stderr and "Traceback" not in missing.stderr
    bad = run("--engine", "sim", "--model-path", str(tmp_path), "--page-size", "0")
    assert bad.returncode == 2 and "--page-size" in bad.stderr
    assert "Traceback" not in bad.stderr
    # One line, no usage block, and it names the command the user typed.
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert bad.stderr.startswith("sglmesh worker: error:"), bad.stderr
    unknown = run("--engine", "sim", "--model-path", str(tmp_path), "--no-such-flag", "1")
    assert unknown.returncode == 2 and "--no-such-flag" in unknown.stderr
    encode = run("--multimodal-encode-worker", "--model-path", str(tmp_path))
    assert encode.returncode == 2 and "takes the vision encoder's .onnx" in encode.stderr
    embed = run("--embedding-worker", "--engine", "sim")
    assert embed.returncode == 2 and "--engine sim generates tokens only" in embed.stderr
    helptext = run("--help")
    assert helptext.returncode == 0
    for flag in ("--namespace", "--nats-url", "--canary-wait-time", "--model-path",
                 "--disaggregation-mode", "--speedup-ratio"):  # fmt: skip
        assert flag in helptext.stdout, flag


@pytest.mark.parametrize("defect", ["no weights", "architecture"])
async def test_torch_worker_refuses_a_model_it_cannot_run(
    mesh: tuple[MeshConfig, DistributedRuntime], tmp_path: Path, defect: str
) -> None:
    """One clear line and exit code 1, before anything registers: a model directory without
    weights, or an architecture the torch engine does not run."""
    pytest.importorskip("torch")
    cfg, rt = mesh
    model = make_test_tokenizer(tmp_path / "model")  # a tokenizer and a config, no weights
    if defect == "architecture":
        config = model / "config.json"
        config.write_text(config.read_text().replace("LlamaForCausalLM", "MambaForCausalLM"))
        (model / "model.safetensors").write_bytes(b"")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sglmesh", "worker", "--engine", "torch",
         "--model-path", str(model), *mesh_flags(cfg), "--system-port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "the engine failed to start" in line]
    assert len(errors) == 1, output
    expected = "sglmesh model prepare" if defect == "no weights" else "MambaForCausalLM"
    assert expected in errors[0], errors
    client = await rt.client("backend", "generate")
    assert client.instances() == []


async def test_follower_node_runs_the_engine_only(
    mesh: tuple[MeshConfig, DistributedRuntime], model_dir: Path, workers: list[Worker]
) -> None:
    cfg, rt = mesh
    follower = Worker(cfg, model_dir, "--nnodes", "2", "--node-rank", "1",
                      "--dist-init-addr", "127.0.0.1:5000")  # fmt: skip
    await start(workers, follower)  # its system server answers: the engine side is up
    client = await rt.client("backend", "generate")
    await asyncio.sleep(1.0)
    assert client.instances() == []  # it never serves or registers
    kvs = list(await rt.etcd.client.get_prefix(f"/{cfg.namespace}/".encode()))
    assert kvs == []
    follower.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(follower.proc.wait, 20) == 0
