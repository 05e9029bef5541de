"""Credentials and TLS for the planes, from the mesh configuration to each client's options.

NATS: nats-py takes every method the server supports (user and password, token, nkey seed,
creds file with a JWT, TLS with or without a client certificate); this only maps the flags
onto its ``connect`` arguments. A user's inbox lives under ``_INBOX.<user>`` so the server's
per-role permissions can give each role its own replies and nobody else's. etcd: see
``etcd_client.py``.
"""

from __future__ import annotations

import ssl
from typing import Any

from shared.config import MeshConfig
from shared.runtime.etcd_client import EtcdAuth

__all__ = ["etcd_auth", "inbox_prefix", "nats_auth_options"]


def inbox_prefix(config: MeshConfig) -> str:
    """``_INBOX.<user>`` for a named NATS user, else nats-py's default ``_INBOX``."""
    return f"_INBOX.{config.nats_user}" if config.nats_user else "_INBOX"


def nats_auth_options(config: MeshConfig) -> dict[str, Any]:
    """Keyword arguments for ``nats.aio.client.Client.connect``."""
    options: dict[str, Any] = {"inbox_prefix": inbox_prefix(config)}
    if config.nats_user is not None:
        options["user"] = config.nats_user
        options["password"] = config.nats_password
    if config.nats_token is not None:
        options["token"] = config.nats_token
    if config.nats_nkey_seed is not None:
        options["nkeys_seed"] = config.nats_nkey_seed
    if config.nats_creds is not None:
        options["user_credentials"] = config.nats_creds
    tls_scheme = any(s.startswith("tls://") for s in config.nats_servers)
    if tls_scheme or config.nats_tls_ca is not None or config.nats_tls_cert is not None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.nats_tls_ca)
        if config.nats_tls_cert is not None:
            context.load_cert_chain(config.nats_tls_cert, config.nats_tls_key)
        options["tls"] = context
    return options


def etcd_auth(config: MeshConfig) -> EtcdAuth:
    return EtcdAuth(
        user=config.etcd_user,
        password=config.etcd_password,
        tls=config.etcd_tls,
        ca=config.etcd_tls_ca,
        cert=config.etcd_tls_cert,
        key=config.etcd_tls_key,
    )
