"""The small endpoints: ``/v1/models``, ``/health``, ``/live``, ``/metrics``,
``/openapi.json``, and the OpenAI-style 404/405 for everything else."""

from __future__ import annotations

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from proto.openai import ModelList, ModelObject, RequestError
from services.processor.context import Serving, authorize
from services.processor.failures import JSON, Failure, failure_for
from services.processor.openapi import openapi_document

__all__ = ["InfoRoutes"]

_encode = msgspec.json.Encoder().encode


class InfoRoutes:
    def __init__(self, s: Serving, known_paths: set[str | None]) -> None:
        self.s = s
        self.known_paths = known_paths
        self._openapi: bytes | None = None

    async def list_models(self, request: web.Request) -> web.Response:
        try:
            authorize(self.s.flags, request)
        except Failure as exc:
            return exc.response()
        data = [
            ModelObject(id=name, created=model.created)
            for name, model in self.s.registry.served_names()
        ]
        return web.Response(body=_encode(ModelList(data=data)), content_type=JSON)

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        try:
            authorize(self.s.flags, request)
            model = self.s.registry.lookup(name)
        except (RequestError, Failure) as exc:
            return failure_for(exc, self.s.flags.retry_after).response()
        body = _encode(ModelObject(id=name, created=model.created))
        return web.Response(body=body, content_type=JSON)

    async def health(self, request: web.Request) -> web.Response:
        s = self.s
        runtime, admission = s.runtime, s.admission
        models = sorted(name for name, _ in s.registry.served_names())
        ready = (
            bool(models)
            and not admission.draining
            and runtime.nats.is_connected
            and not runtime.shutting_down
        )
        body = {
            "status": "healthy" if ready else "unhealthy",  # "draining" below
            "models": models,
            "inflight": admission.inflight,
            "engine_inflight": admission.engine_inflight,
            "nats": "connected" if runtime.nats.is_connected else "disconnected",
            "etcd": "healthy" if runtime.etcd.healthy else "unreachable",
        }
        if admission.draining or runtime.shutting_down:
            body["status"] = "draining"
        return web.json_response(body, status=200 if ready else 503)

    async def live(self, request: web.Request) -> web.Response:
        if self.s.runtime.shutting_down and not self.s.admission.draining:
            return web.json_response({"status": "shutting_down"}, status=503)
        return web.json_response({"status": "live"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = _encode(openapi_document())
        return web.Response(body=self._openapi, content_type=JSON)

    async def not_found(self, request: web.Request) -> web.Response:
        if request.path in self.known_paths:
            return Failure(
                405,
                f"Method {request.method} is not allowed on {request.path}",
                type_="invalid_request_error",
            ).response()
        return Failure(404, f"Unknown path {request.path}").response()
