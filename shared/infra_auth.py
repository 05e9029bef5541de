"""Local credentials for the mesh's own NATS and etcd: per-role users with least privilege.

Why: nothing on the planes is anonymous, a laptop included. ``sglmesh infra up`` and
``sglmesh run`` call :func:`ensure_credentials` (random passwords, made once per run dir and
kept, mode 0600 under ``<run dir>/credentials``), start nats-server with the config
:func:`nats_config` writes, and turn etcd's authentication on with :func:`enable_etcd_auth`.
Each role's password is in ``<role>.env`` (``SGLMESH_*`` lines) for ``--credentials``.

Roles and what they may do (``*`` is any namespace on NATS; etcd keys are per namespace):

- ``processor``: publish requests (``<ns>.<component>.<endpoint>[.<instance>]``) and control
  messages; subscribe to its own inbox, control subject and the relayed events; read etcd.
- ``worker``: subscribe to endpoint subjects (queue group and direct) and its control subject;
  publish only into callers' inboxes (its replies); read and write its instance records and
  model cards, and publish its model files (``files/``, shared/model_files.py).
- ``publisher``: publish the relayed events and replies; serve ``<ns>.publisher.*``; read the
  instances, write its own records.
- ``admin`` (``sglmesh status``, operators): ask the publishers; read etcd.

Nobody but the publisher may publish ``<ns>.events.>``: a worker credential cannot forge
another worker's KV events. The limit of role-level permissions: a worker may subscribe to
every worker's direct subject (NATS permissions know roles, not instances); per-instance
credentials would need NATS's JWT accounts.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ROLES",
    "Credentials",
    "enable_etcd_auth",
    "ensure_credentials",
    "load_credentials",
    "nats_config",
]

ROLES = ("processor", "worker", "publisher", "admin")
_CONTROL = "_SGLMESH.ctl.*"


def _inbox(user: str) -> str:
    return f"_INBOX.{user}.>"


# NATS permissions per role: (publish allow, subscribe allow).
_NATS_PERMISSIONS: dict[str, tuple[list[str], list[str]]] = {
    "processor": (
        ["*.*.*", "*.*.*.*", _CONTROL],
        [_inbox("processor"), _CONTROL, "*.events.>"],
    ),
    "worker": (
        ["_INBOX.>"],
        [
            "*.*.generate",
            "*.*.generate.*",
            "*.*.clear_kv_blocks",
            "*.*.clear_kv_blocks.*",
            _CONTROL,
            _inbox("worker"),
        ],
    ),
    "publisher": (
        ["*.events.kv.*", "*.events.load.*", "_INBOX.>"],
        ["*.publisher.*", "*.publisher.*.*", _CONTROL, _inbox("publisher")],
    ),
    "admin": (
        ["*.publisher.*", "*.publisher.*.*", _CONTROL],
        [_inbox("admin"), _CONTROL],
    ),
}
# Publishing events is the publisher's alone, whatever another role's allow list matches.
_NATS_DENY_PUBLISH = {"processor": ["*.events.>"], "admin": ["*.events.>"]}

# etcd key prefixes per role: (read-only prefixes, read-write prefixes), under /<ns>/.
_ETCD_PERMISSIONS: dict[str, tuple[list[str], list[str]]] = {
    "processor": ([""], []),
    "worker": (
        [],
        ["instances/backend/", "instances/prefill/", "instances/encode/", "models/", "files/"],
    ),
    "publisher": (["instances/"], ["instances/publisher/"]),
    "admin": ([""], []),
}


@dataclass(frozen=True)
class Credentials:
    """The run dir's secrets: a password per role (NATS and etcd), etcd's root password and
    the workers' admin token."""

    directory: Path
    passwords: dict[str, str]
    etcd_root_password: str
    admin_token: str

    def env_file(self, role: str) -> Path:
        return self.directory / f"{role}.env"

    @property
    def nats_config(self) -> Path:
        return self.directory / "nats.conf"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def ensure_credentials(run_dir: Path) -> Credentials:
    """The credentials under ``run_dir/credentials``, made on first use and kept after."""
    directory = run_dir / "credentials"
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    secrets_file = directory / "secrets.json"
    try:
        stored = json.loads(secrets_file.read_text())
    except (OSError, ValueError):
        stored = {}
    passwords = {role: str(stored.get(role) or secrets.token_urlsafe(24)) for role in ROLES}
    root = str(stored.get("etcd_root") or secrets.token_urlsafe(24))
    admin_token = str(stored.get("admin_token") or secrets.token_urlsafe(24))
    _write_private(
        secrets_file,
        json.dumps({**passwords, "etcd_root": root, "admin_token": admin_token}, indent=1),
    )
    creds = Credentials(directory, passwords, root, admin_token)
    for role in ROLES:
        lines = [
            f"# {role} credentials for the mesh's NATS and etcd (sglmesh infra up)",
            f"SGLMESH_NATS_USER={role}",
            f"SGLMESH_NATS_PASSWORD={passwords[role]}",
            f"SGLMESH_ETCD_USER={role}",
            f"SGLMESH_ETCD_PASSWORD={passwords[role]}",
        ]
        if role in ("worker", "publisher", "admin"):
            lines.append(f"SGLMESH_ADMIN_TOKEN={admin_token}")
        _write_private(creds.env_file(role), "\n".join(lines) + "\n")
    _write_private(creds.nats_config, nats_config(passwords))
    return creds


def load_credentials(directory: Path) -> Credentials:
    """Credentials made elsewhere (a mounted Kubernetes Secret): read, never written."""
    try:
        stored = json.loads((directory / "secrets.json").read_text())
        return Credentials(
            directory,
            {role: str(stored[role]) for role in ROLES},
            str(stored["etcd_root"]),
            str(stored["admin_token"]),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"no usable credentials in {directory}: {exc}") from exc


def _quote(text: str) -> str:
    return json.dumps(text)


def nats_config(passwords: dict[str, str]) -> str:
    """nats-server configuration: one user per role with its subject permissions."""
    users = []
    for role in ROLES:
        publish, subscribe = _NATS_PERMISSIONS[role]
        deny = _NATS_DENY_PUBLISH.get(role, [])
        publish_map = f"allow: {json.dumps(publish)}" + (
            f", deny: {json.dumps(deny)}" if deny else ""
        )
        users.append(
            f"    {{user: {_quote(role)}, password: {_quote(passwords[role])}, permissions: {{\n"
            f"      publish: {{{publish_map}}}\n"
            f"      subscribe: {{allow: {json.dumps(subscribe)}}}\n"
            "    }}"
        )
    return (
        "# Written by sglmesh (shared/infra_auth.py): per-role users, least privilege.\n"
        "authorization {\n  users: [\n" + "\n".join(users) + "\n  ]\n}\n"
    )


def _permission_ranges(namespace: str, role: str) -> list[tuple[int, bytes, bytes]]:
    from aetcd import rpc
    from aetcd.utils import prefix_range_end

    read, write = _ETCD_PERMISSIONS[role]
    out = []
    for kind, prefixes in ((rpc.Permission.READ, read), (rpc.Permission.READWRITE, write)):
        for prefix in prefixes:
            key = f"/{namespace}/{prefix}".encode()
            out.append((kind, key, prefix_range_end(key)))
    return out


async def enable_etcd_auth(host: str, port: int, creds: Credentials, namespace: str) -> None:
    """Create the root user, a user and role per mesh role, and turn authentication on.

    Idempotent: on an etcd whose auth is already on (a restart with its data), it logs in as
    root with the stored password and makes sure every user, role and password is there."""
    import grpc
    from aetcd import rpc

    async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
        auth = rpc.AuthStub(channel)
        metadata: tuple[tuple[str, str], ...] | None = None
        try:
            status = await auth.AuthStatus(rpc.AuthStatusRequest(), timeout=5)
            enabled = bool(status.enabled)
        except grpc.aio.AioRpcError:
            enabled = False
        if enabled:
            token = await auth.Authenticate(
                rpc.AuthenticateRequest(name="root", password=creds.etcd_root_password),
                timeout=5,
            )
            metadata = (("token", token.token),)

        async def call(method: str, request: object) -> None:
            try:
                await getattr(auth, method)(request, timeout=5, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                if "already" not in (exc.details() or ""):
                    raise

        users = {"root": creds.etcd_root_password, **creds.passwords}
        for user, password in users.items():
            await call("UserAdd", rpc.AuthUserAddRequest(name=user, password=password))
            await call(
                "UserChangePassword",
                rpc.AuthUserChangePasswordRequest(name=user, password=password),
            )
        await call("UserGrantRole", rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        for role in ROLES:
            role_name = f"sglmesh-{role}"
            await call("RoleAdd", rpc.AuthRoleAddRequest(name=role_name))
            for kind, key, end in _permission_ranges(namespace, role):
                await call(
                    "RoleGrantPermission",
                    rpc.AuthRoleGrantPermissionRequest(
                        name=role_name, perm=rpc.Permission(permType=kind, key=key, range_end=end)
                    ),
                )
            await call("UserGrantRole", rpc.AuthUserGrantRoleRequest(user=role, role=role_name))
        if not enabled:
            await call("AuthEnable", rpc.AuthEnableRequest())
