"""TLS on every plane, with certificates from a throwaway CA (trustme): the processor's HTTPS,
NATS over TLS and etcd over HTTPS, each with the mesh's own client code and real servers."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from shared.config import MeshConfig
from shared.infra import EtcdServer, NatsServer
from shared.runtime import DistributedRuntime
from tests.integration.processor_mesh import mesh


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": root / "ca.pem", "cert": root / "cert.pem", "key": root / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    yield paths


async def test_https_on_a_running_processor(
    pki: dict[str, Path], nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    async with mesh(nats_server, etcd_server, tmp_path) as m:
        p = m.add_processor("--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]))
        context = ssl.create_default_context(cafile=str(pki["ca"]))
        url = f"https://127.0.0.1:{p.http_port}/live"
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(url, ssl=context) as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientConnectorError:
                    assert p.alive(), p.output()
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError(p.output())
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{p.http_port}/live") as resp:
                    await resp.read()


@pytest.fixture
def tls_nats(pki: dict[str, Path], tmp_path: Path) -> Iterator[NatsServer]:
    config = tmp_path / "nats.conf"
    config.write_text(
        "tls {\n"
        f"  cert_file: {json.dumps(str(pki['cert']))}\n"
        f"  key_file: {json.dumps(str(pki['key']))}\n"
        "}\n"
    )
    with NatsServer(data_dir=tmp_path / "nats", config_file=config) as server:
        yield server


@pytest.fixture
def tls_etcd(pki: dict[str, Path], tmp_path: Path) -> Iterator[EtcdServer]:
    tls = (pki["cert"], pki["key"], pki["ca"])
    with EtcdServer(data_dir=tmp_path / "etcd-data", tls=tls) as server:
        yield server


async def test_the_mesh_runs_over_tls_nats_and_https_etcd(
    pki: dict[str, Path], tls_nats: NatsServer, tls_etcd: EtcdServer
) -> None:
    assert tls_etcd.endpoint.startswith("https://")
    cfg = MeshConfig(
        namespace="tls",
        nats_url=f"tls://127.0.0.1:{tls_nats.port}",
        etcd_endpoints=[tls_etcd.endpoint],
        nats_tls_ca=str(pki["ca"]),
        etcd_tls_ca=str(pki["ca"]),
        lease_ttl=2,
    )
    worker = DistributedRuntime(cfg)
    caller = DistributedRuntime(cfg)
    await worker.start()
    await caller.start()

    async def handler(request: Any, ctx: Any) -> AsyncIterator[Any]:
        yield {"echo": request}

    try:
        await worker.endpoint("backend", "generate").serve(handler)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(1, timeout=5)
        assert [c async for c in await client.generate("hi")] == [{"echo": "hi"}]
    finally:
        await caller.shutdown(grace=0.5)
        await worker.shutdown(grace=0.5)
    # Without the CA, neither plane lets the client in.
    untrusting = MeshConfig(
        namespace="tls",
        nats_url=f"tls://127.0.0.1:{tls_nats.port}",
        etcd_endpoints=[tls_etcd.endpoint],
    )
    with pytest.raises(ConnectionError):
        await DistributedRuntime(untrusting).start(connect_timeout=2)
