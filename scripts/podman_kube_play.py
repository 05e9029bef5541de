"""Run the rendered aggregated overlay with ``podman kube play`` and send it a chat request.

Why: the manifests are validated against Kubernetes' schemas, but nothing ran them; podman's
``kube play`` runs Pods, Deployments and ConfigMaps without a cluster. Podman 4.3 (Debian 12)
cannot take the rendering as it is, so this script adapts it, and each adaptation is a thing
``kube play`` cannot express (printed on every run):

- StatefulSet (NATS and etcd as 3-member clusters: per-pod DNS names through headless
  Services, volumeClaimTemplates): not supported; each becomes ONE Pod named after its
  Service, etcd as a single member with its data in the container (an emptyDir in its place
  fails: "error listing data dir") and NATS without cluster routes.
- Job (etcd-auth): not supported; it becomes a Pod with the Job's restartPolicy.
- Deployments become Pods named after their Service: podman names a Deployment's pod
  ``<name>-pod`` and answers DNS for pod names only (no Services, no cluster IPs), and runs
  one replica whatever ``replicas`` says.
- Native sidecars (initContainers with ``restartPolicy: Always``, the KV publisher): podman
  runs init containers to completion before the others, so the worker would never start;
  the sidecar becomes an ordinary container of the pod.
- Secret volumes crash podman 4.3's kube play (nil pointer in VolumeFromSecret): they become
  hostPath mounts of a directory holding the same files (0444: NATS runs as root
  with every capability dropped, so it cannot read 0440 files of uid 10001).
- Service, HorizontalPodAutoscaler, PodDisruptionBudget, NetworkPolicy, ServiceMonitor:
  dropped (nothing to enforce or scrape them); the processor's port is published on the
  host (``hostPort``) in place of a Service.

Usage (root, Debian's podman/buildah/runc; the images built as in ``make compose-test``'s
notes in README, tagged docker.io/sglmesh/<target>:latest; ``localhost/debian-python:3.11``
also carries Debian's nats-server and etcd):

    python scripts/podman_kube_play.py [--keep]

Leaves nothing running (``podman kube down``) unless ``--keep``.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.infra import free_port  # noqa: E402
from shared.infra_auth import ensure_credentials  # noqa: E402

PODMAN = ["podman", "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs",
          "--runtime", "runc"]  # fmt: skip
NETWORK = "sglmesh-kube"
INFRA_IMAGE = "localhost/debian-python:3.11"  # Debian's nats-server 2.9 and etcd 3.4 inside
DROPPED = {"Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
           "ServiceMonitor"}  # fmt: skip
MODEL = "smollm2-135m-instruct"


def _pod(name: str, template: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(template["spec"])
    sidecars = [c for c in spec.pop("initContainers", []) if c.pop("restartPolicy", None)]
    spec["containers"] = [*spec["containers"], *sidecars]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": template["metadata"].get("labels", {})},
            "spec": spec}  # fmt: skip


def adapt(docs: list[dict[str, Any]], creds: Path, http_port: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    notes: list[str] = []
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in DROPPED:
            notes.append(f"dropped {kind} {name}")
        elif kind == "ConfigMap":
            out.append(doc)
        elif kind in ("Deployment", "StatefulSet", "Job"):
            pod = _pod(name, doc["spec"]["template"])
            notes.append(f"{kind} {name} -> Pod {name} (one replica)")
            out.append(pod)
        else:
            raise SystemExit(f"unexpected kind {kind} in the rendering")
    for pod in out:
        if pod["kind"] != "Pod":
            continue
        spec = pod["spec"]
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                secret = volume.pop("secret")["secretName"]
                volume["hostPath"] = {"path": str(creds / secret), "type": "Directory"}
        for container in spec["containers"]:
            if pod["metadata"]["name"] == "etcd":
                container["image"] = INFRA_IMAGE
                container["command"] = [
                    "etcd", "--name=etcd", "--data-dir=/tmp/etcd-data",
                    "--listen-client-urls=http://0.0.0.0:2379",
                    "--advertise-client-urls=http://etcd:2379",
                ]  # fmt: skip
                # Its volumeClaimTemplate has no counterpart, and on an emptyDir etcd 3.4
                # (root, every capability dropped) fails "error listing data dir".
                container.pop("volumeMounts", None)
                container.pop("env", None)
            if pod["metadata"]["name"] == "nats":
                container["image"] = INFRA_IMAGE
                container["command"] = ["nats-server"]
                args = container["args"]
                container["args"] = args[: args.index("--cluster_name")]
            if pod["metadata"]["name"] == "processor":
                for port in container.get("ports", []):
                    if port["containerPort"] == 8000:
                        port["hostPort"] = http_port
                        port["hostIP"] = "127.0.0.1"
    notes.append("Secret volumes -> hostPath (kube play 4.3 panics on them)")
    notes.append("etcd: one member, nats: no cluster routes (StatefulSet identities needed)")
    print("\n".join(f"  adapted: {n}" for n in notes))
    return out


def _secrets(root: Path, api_key: str) -> Path:
    made = ensure_credentials(root / "state").directory
    creds = root / "secrets"
    (creds / "sglmesh-credentials").mkdir(parents=True)
    (creds / "sglmesh-api-key").mkdir()
    for path in made.iterdir():
        shutil.copy(path, creds / "sglmesh-credentials" / path.name)
    (creds / "sglmesh-api-key" / "api-key").write_text(api_key)
    for path in creds.rglob("*"):
        os.chown(path, 10001, 10001)
        os.chmod(path, 0o755 if path.is_dir() else 0o444)
    return creds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the pods running")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for chat")
    args = parser.parse_args()
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / "agg")],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    root = Path(tempfile.mkdtemp(prefix="sglmesh-kube-", dir=ROOT / ".run"))
    os.chmod(root, 0o755)
    api_key = base64.b16encode(os.urandom(12)).decode().lower()
    http_port = free_port()
    played = root / "played.yaml"
    # secure-etcd (the Job) needs the api key Secret only in the processor; the ConfigMap's
    # env is read by every pod.
    for doc in docs:
        for env in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for var in env.get("env", []):
                if var.get("valueFrom", {}).get("secretKeyRef"):
                    var.pop("valueFrom")
                    var["value"] = api_key  # kube play's secretKeyRef reads podman secrets
    played.write_text(yaml.safe_dump_all(adapt(docs, _secrets(root, api_key), http_port)))
    # podman 4.3 has no --ignore: an existing network is fine.
    subprocess.run([*PODMAN, "network", "create", NETWORK], capture_output=True)
    started = time.monotonic()
    play = subprocess.run([*PODMAN, "kube", "play", "--network", NETWORK, str(played)],
                          capture_output=True, text=True)  # fmt: skip
    print(play.stdout[-2000:], play.stderr[-2000:], sep="\n")
    ok = False
    try:
        deadline = time.monotonic() + args.timeout
        message = {"role": "user", "content": "Hello!"}
        body = json.dumps({"model": MODEL, "max_tokens": 8, "messages": [message]}).encode()
        last = ""
        while time.monotonic() < deadline:
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v1/chat/completions", data=body,
                headers={"Content-Type": "application/json",
                         "Authorization": f"Bearer {api_key}"},
            )  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    answer = json.loads(resp.read())
                    print(f"chat answered after {time.monotonic() - started:.0f} s:",
                          json.dumps(answer["choices"][0]["message"])[:200])  # fmt: skip
                    ok = True
                    break
            except Exception as exc:  # connection refused, 503 while the model registers
                last = str(exc)
            time.sleep(3)
        if not ok:
            print(f"no chat answer within {args.timeout:.0f} s: {last}")
        subprocess.run([*PODMAN, "pod", "ps"], check=False)
        for pod in ("processor", "worker", "etcd-auth", "etcd", "nats"):
            logs = subprocess.run([*PODMAN, "pod", "logs", "--tail", "5", pod],
                                  capture_output=True, text=True)  # fmt: skip
            print(f"--- {pod} ---\n{logs.stdout[-1500:]}{logs.stderr[-500:]}")
    finally:
        if not args.keep:
            subprocess.run([*PODMAN, "kube", "down", str(played)], capture_output=True)
            subprocess.run([*PODMAN, "network", "rm", NETWORK], capture_output=True)
            shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
