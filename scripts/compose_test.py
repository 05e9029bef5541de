"""Bring the shipped compose file up in real containers, use it, break it, and tear it down.

Why: the compose file is parsed and cross-checked in ``make test``, but only running it shows
that the images build, the services find each other and the mesh answers. Docker's engine is
absent here, so this drives Debian's podman and buildah (root, overlay storage, runc, cgroupfs)
and PyPI's ``podman-compose`` over ``compose/docker-compose.yml`` as shipped, per profile:

1. build the five images from the one Dockerfile (buildah, ``--layers``), on a Debian base made
   by debootstrap when no registry is reachable (``--base``);
2. bring the profile up; chat (plain and with an image) and an embedding through the
   processor's published port; KV routing live (the processor's router sees the worker's
   cached blocks through its publisher sidecar);
3. ``kill -9`` an LLM worker container's process from the host; its restart policy brings it
   back (podman 4.3's does not always fire: the script then starts it, and says so) and chat
   answers again;
4. ``podman-compose down -v``; no container, volume or network of the project is left.

What the file needs here that it does not say, each printed as it is applied (a small
override file, beside the shipped one, never an edit of it):

- images for NATS and etcd: their registries are unreachable, so both run from the local
  Debian base (its nats-server 2.9 and etcd 3.4) with the shipped command lines;
- host ports on loopback, free ones (the shipped 8000/4222/2379 may be taken);
- podman 4.3 (Debian 12) has no health checks without systemd, so podman-compose skips
  ``service_healthy`` conditions there, and it refuses a ``--requires`` chain that runs through
  an exited one-shot container ("depends on container ... not found in input list"). This
  script therefore starts the services in their dependency order itself, one stage at a time
  with ``--no-deps``, waiting for each stage as its condition says (health by running the
  container's own health check command, completion by the exit code).

Usage (root): ``make compose-test`` or ``python scripts/compose_test.py [--profile agg]
[--no-build] [--keep]``. Needs podman, buildah, runc (and debootstrap without a base image):
``apt-get install podman buildah runc debootstrap``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"
sys.path.insert(0, str(ROOT))

from shared.infra import free_port  # noqa: E402

BASE_IMAGE = "localhost/debian-python:3.11"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TARGETS = ("processor", "prefill", "decode", "publisher", "encode")
PROJECT = "sglmesh-compose-test"
CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
# The LLM worker each profile's fault test kills (its restart policy must bring it back).
VICTIM = {"agg": "worker", "disagg": "decode"}
# How long podman gets to restart the killed worker before the script starts it itself.
RESTART_WAIT_S = 20.0
# The base: Debian's python with venv and pip, and the two servers the mesh needs.
BASE_PACKAGES = ("python3,python3-venv,python3-pip,python-is-python3,ca-certificates,wget,"
                 "nats-server,etcd-server,etcd-client")  # fmt: skip
# Debian's podman settings for this machine (no systemd; crun refuses here, runc works), with
# the limits runc can set in this sandbox. Overlay storage: vfs works too but copies the whole
# file system at every build step (a build from nothing filled over 40 GB).
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
STORAGE_CONF = """\
[storage]
driver = "overlay"
runroot = "{runroot}"
graphroot = "{graphroot}"
"""


def log(message: str) -> None:
    print(f"[compose-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd: list[str], env: dict[str, str], check: bool = True, quiet: bool = False,
        timeout: float | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise SystemExit(f"compose-test: {' '.join(cmd[:6])} ... failed ({done.returncode}):\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")  # fmt: skip
    if not quiet and done.stdout.strip():
        print(done.stdout.rstrip()[-1500:])
    return done


class Podman:
    """podman, buildah and podman-compose under one configuration (a directory of conf files)."""

    def __init__(self, workdir: Path, fresh: bool) -> None:
        (workdir / "containers.conf").write_text(CONTAINERS_CONF)
        # --fresh: images, containers and volumes in a store of this run's own, deleted with it
        # (nothing cached: what CI sees; nothing left behind).
        graphroot, runroot = (
            (workdir / "graph", workdir / "run") if fresh
            else ("/var/lib/containers/storage", "/run/containers/storage")
        )  # fmt: skip
        (workdir / "storage.conf").write_text(
            STORAGE_CONF.format(graphroot=graphroot, runroot=runroot))  # fmt: skip
        self.env = {**os.environ,
                    "CONTAINERS_CONF": str(workdir / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(workdir / "storage.conf")}  # fmt: skip
        self.workdir = workdir

    def podman(self, *args: str, check: bool = True, quiet: bool = True,
               timeout: float | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return run(["podman", *args], self.env, check=check, quiet=quiet, timeout=timeout)

    def discard_store(self) -> None:
        """Empty the private store (--fresh) and unmount what overlay left mounted in it, so
        the work directory can go. Not `system reset`: it would drop every podman network of
        the machine, whose definitions are global."""
        self.podman("rm", "--all", "--force", "--time", "0", check=False, timeout=300)
        self.podman("rmi", "--all", "--force", check=False, timeout=300)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(self.workdir))), reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)

    def image_exists(self, name: str) -> bool:
        return self.podman("image", "exists", name, check=False).returncode == 0


def ensure_base(pm: Podman) -> None:
    """The Debian base the images build on, made by debootstrap when it is not there yet."""
    if pm.image_exists(BASE_IMAGE):
        log(f"base image {BASE_IMAGE} present")
        return
    if shutil.which("debootstrap") is None:
        raise SystemExit("compose-test: no base image and no debootstrap "
                         "(apt-get install debootstrap)")  # fmt: skip
    started = time.monotonic()
    rootfs = pm.workdir / "rootfs"
    log(f"debootstrap bookworm ({BASE_PACKAGES}) ...")
    run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
         str(rootfs), "http://deb.debian.org/debian"], pm.env, quiet=True)  # fmt: skip
    # The machine's CA bundle, so pip in the build trusts what the machine trusts.
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt")
    tar = pm.workdir / "rootfs.tar"
    run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], pm.env)
    # A PATH of its own: podman run supplies one to an image without it, kube play does not.
    pm.podman("import", "--change", f"ENV=PATH={BASE_PATH}", "--change", "CMD=/usr/bin/python3",
              str(tar), BASE_IMAGE)  # fmt: skip
    shutil.rmtree(rootfs)
    tar.unlink()
    log(f"base image built in {time.monotonic() - started:.0f} s")


def build(pm: Podman) -> dict[str, float]:
    """Every target of the one Dockerfile, tagged as the compose file names them."""
    seconds: dict[str, float] = {}
    wheels = Path("/opt/wheels")
    for target in TARGETS:
        started = time.monotonic()
        cmd = ["buildah", "bud", "--isolation", "chroot", "--layers", "--format", "docker",
               "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}", "--target", target,
               "-t", f"docker.io/sglmesh/{target}:latest",
               "-f", str(ROOT / "Dockerfile")]  # fmt: skip
        if target == "encode" and any(wheels.glob("torch-2.13.0+cpu-*.whl")):
            # PyTorch's CPU index is out of reach here; the machine's own wheel is the same build.
            cmd += ["--volume", f"{wheels}:{wheels}:ro", "--build-arg", f"TORCH_WHEEL_DIR={wheels}"]
        log(f"building {target} ...")
        run([*cmd, str(ROOT)], pm.env, quiet=True)
        seconds[target] = round(time.monotonic() - started, 1)
        log(f"built {target} in {seconds[target]:.0f} s")
    return seconds


def start_order(services: dict[str, Any]) -> list[list[str]]:
    """The services grouped so that each group depends only on earlier groups."""
    deps = {name: set(spec.get("depends_on") or {}) & set(services)
            for name, spec in services.items()}  # fmt: skip
    stages: list[list[str]] = []
    placed: set[str] = set()
    while len(placed) < len(deps):
        ready = sorted(n for n, d in deps.items() if n not in placed and d <= placed)
        if not ready:
            raise SystemExit(f"compose-test: a dependency cycle among {set(deps) - placed}")
        stages.append(ready)
        placed.update(ready)
    return stages


def profile_services(profile: str) -> dict[str, Any]:
    """The shipped file's services that run in one profile (and those without a profile)."""
    shipped: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return {name: spec for name, spec in shipped.items()
            if not spec.get("profiles") or profile in spec["profiles"]}  # fmt: skip


class Stack:
    """One profile of the shipped compose file under podman-compose."""

    def __init__(self, pm: Podman, profile: str, api_key: str) -> None:
        self.pm = pm
        self.profile = profile
        self.api_key = api_key
        self.http_port = free_port()
        self.override = pm.workdir / f"override-{profile}.yml"
        self.override.write_text(self._override())
        self.services = profile_services(profile)

    def _override(self) -> str:
        log("override: nats and etcd from the local Debian base (no registry reachable); "
            f"the processor on 127.0.0.1:{self.http_port}; no other host ports")  # fmt: skip
        # podman-compose appends lists when it merges files: !reset and !override replace them.
        return f"""\
services:
  nats:
    image: {BASE_IMAGE}
    entrypoint: ["nats-server"]
    ports: !reset []
  etcd:
    image: {BASE_IMAGE}
    ports: !reset []
  processor:
    ports: !override ["127.0.0.1:{self.http_port}:8000"]
"""

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**self.pm.env, "SGLMESH_API_KEY": self.api_key}
        cmd = [sys.executable, "-m", "podman_compose", "--in-pod", "false", "-p", PROJECT,
               "-f", str(COMPOSE_FILE), "-f", str(self.override), "--profile", self.profile,
               *args]  # fmt: skip
        return run(cmd, env, check=check, quiet=True, timeout=600)

    # -- bring-up in dependency order -------------------------------------------------------

    def container(self, service: str) -> str:
        out = self.pm.podman(
            "ps", "-a", "--format", "{{.Names}}",
            "--filter", f"label=io.podman.compose.project={PROJECT}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).stdout.split()  # fmt: skip
        if not out:
            raise SystemExit(f"compose-test: no container for service {service}")
        return out[0]

    def wait_healthy(self, service: str, timeout: float = 180) -> None:
        """Run the service's own health check (compose's, else the image's) until it passes."""
        name = self.container(service)
        test = self.services[service].get("healthcheck", {}).get("test")
        if test is None:
            image = self.pm.podman("inspect", "--format", "{{json .Config.Healthcheck}}", name)
            test = (json.loads(image.stdout or "null") or {}).get("Test")
        if not test:
            return
        argv = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pm.podman("exec", name, *argv, check=False, timeout=30).returncode == 0:
                return
            state = self.pm.podman("inspect", "--format", "{{.State.Status}}", name).stdout
            if state.strip() == "exited" and self.services[service].get("restart") == "no":
                break
            time.sleep(2)
        raise SystemExit(f"compose-test: {service} not healthy within {timeout:.0f} s\n"
                         f"{self.logs(service)}")  # fmt: skip

    def wait_completed(self, service: str, timeout: float = 180) -> None:
        name = self.container(service)
        code = self.pm.podman("wait", name, timeout=timeout).stdout.strip()
        if code != "0":
            raise SystemExit(f"compose-test: one-shot {service} exited {code}\n"
                             f"{self.logs(service)}")  # fmt: skip

    def wait_restarted(self, name: str, timeout: float) -> bool:
        """Whether podman restarted the container (its restart policy) within the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(1)
            state = self.pm.podman("inspect", "--format", "{{.RestartCount}} {{.State.Status}}",
                                   name).stdout.split()  # fmt: skip
            if int(state[0]) >= 1 and state[1] == "running":
                return True
        return False

    def logs(self, service: str, tail: int = 30) -> str:
        done = self.pm.podman("logs", "--tail", str(tail), self.container(service), check=False)
        return f"--- {service} ---\n{done.stdout[-4000:]}{done.stderr[-4000:]}"

    def up(self) -> float:
        started = time.monotonic()
        conditions = {dep: cond.get("condition", "service_started")
                      for spec in self.services.values()
                      for dep, cond in (spec.get("depends_on") or {}).items()}  # fmt: skip
        for stage in start_order(self.services):
            log(f"up: {', '.join(stage)}")
            self.compose("up", "-d", "--no-deps", "--no-build", *stage)
            for service in stage:
                condition = conditions.get(service)
                if condition == "service_completed_successfully":
                    self.wait_completed(service)
                elif condition == "service_healthy":
                    self.wait_healthy(service)
        return time.monotonic() - started

    def down(self) -> None:
        self.compose("down", "-v", "-t", "10", check=False)

    def leftovers(self) -> list[tuple[str, str]]:
        """(kind, name) of every container, volume and network of the project still there."""
        label = f"label=io.podman.compose.project={PROJECT}"
        found = []
        for kind, listing, field in (("container", ["ps", "-a"], "{{.Names}}"),
                                     ("volume", ["volume", "ls"], "{{.Name}}"),
                                     ("network", ["network", "ls"], "{{.Name}}")):  # fmt: skip
            out = self.pm.podman(*listing, "--filter", label, "--format", field, check=False)
            found += [(kind, name) for name in out.stdout.split()]
        return found

    def tear_down(self) -> list[str]:
        """``down -v``, then force away what it left (a container podman lost track of, as
        after a failed restart); returns what had to be forced. Fails if anything stays."""
        self.down()
        forced = [f"{kind} {name}" for kind, name in self.leftovers()]
        for kind, name in self.leftovers():
            args = ["rm", "-f", "-t", "0"] if kind == "container" else [kind, "rm", "-f"]
            self.pm.podman(*args, name, check=False)
        left = self.leftovers()
        if left:
            raise SystemExit(f"compose-test: left behind even by force: {left}")
        return forced

    # -- using the mesh --------------------------------------------------------------------

    def request(self, path: str, body: dict[str, Any] | None = None,
                timeout: float = 60) -> dict[str, Any]:  # fmt: skip
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data,
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {self.api_key}"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            return answer

    def until(self, what: str, call: Any, timeout: float = 240) -> Any:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                return call()
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError,
                    AssertionError, KeyError) as exc:  # fmt: skip
                last = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, urllib.error.HTTPError):
                    last += " " + exc.read().decode(errors="replace")[:300]
            time.sleep(2)
        raise SystemExit(f"compose-test: {what} not within {timeout:.0f} s: {last}")

    def chat(self, content: Any = "What is the capital of France?") -> dict[str, Any]:
        answer = self.request("/v1/chat/completions", {
            "model": CHAT_MODEL, "max_tokens": 16,
            "messages": [{"role": "user", "content": content}]})  # fmt: skip
        assert answer["choices"][0]["message"]["content"], answer
        return answer

    def kv_overlap(self) -> tuple[float, float]:
        """The router's expected cache overlap (sum, count) from the processor's /metrics."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/metrics",
            headers={"Authorization": f"Bearer {self.api_key}"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            text = resp.read().decode()
        found = {}
        for line in text.splitlines():
            for part in ("sum", "count"):
                name = f"sglmesh_processor_kv_overlap_ratio_{part}{{"
                if line.startswith(name) and f'model="{CHAT_MODEL}"' in line:
                    found[part] = float(line.rsplit(" ", 1)[1])
        return found.get("sum", 0.0), found.get("count", 0.0)

    def kv_routing(self, topic: str) -> float:
        """A long prompt twice: the second time the router expects it in a worker's cache,
        which it knows only from the KV events the worker's publisher sidecar relayed."""
        prompt = f"tell me a long story about {topic} and the moon and the stars " * 8
        body = {"model": CHAT_MODEL, "prompt": prompt, "max_tokens": 4}
        self.request("/v1/completions", body)
        time.sleep(2)
        before = self.kv_overlap()
        self.request("/v1/completions", body)
        after = self.kv_overlap()
        assert after[1] > before[1], (before, after)
        gained = after[0] - before[0]
        assert gained >= 0.5, f"the router expected only {gained:.2f} of the prompt cached"
        return gained


def png_data_url() -> str:
    """A small real PNG (Pillow), as a chat image part's data URL."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 90)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def exercise(stack: Stack) -> dict[str, Any]:
    """Chat, image chat, embeddings and KV routing, then a worker killed and its recovery."""
    figures: dict[str, Any] = {}
    started = time.monotonic()
    first = stack.until("a chat answer", stack.chat)
    figures["first_chat_s"] = round(time.monotonic() - started, 1)
    log(f"chat: {first['choices'][0]['message']['content']!r} "
        f"({first['usage']['prompt_tokens']} prompt tokens)")  # fmt: skip
    image = [{"type": "text", "text": "What colour is this?"},
             {"type": "image_url", "image_url": {"url": png_data_url()}}]  # fmt: skip
    with_image = stack.until("a chat answer with an image", lambda: stack.chat(image))
    extra = with_image["usage"]["prompt_tokens"] - first["usage"]["prompt_tokens"]
    assert extra > 0, "the image added no prompt tokens"
    log(f"chat with an image: {with_image['usage']['prompt_tokens']} prompt tokens")
    embedding = stack.until("an embedding", lambda: stack.request(
        "/v1/embeddings", {"model": EMBED_MODEL, "input": "Paris is in France."}))  # fmt: skip
    log(f"embedding: {len(embedding['data'][0]['embedding'])} dimensions")
    overlap = stack.until("KV routing", lambda: stack.kv_routing("the sun"), timeout=60)
    log(f"KV routing live: the router expected {overlap:.0%} of a repeated prompt cached")
    # A crash, as the OOM killer makes one: SIGKILL to the container's process from the host.
    # (`podman kill` would count as a stop by the user, which `unless-stopped` never restarts.)
    victim = stack.container(VICTIM[stack.profile])
    pid = int(stack.pm.podman("inspect", "--format", "{{.State.Pid}}", victim).stdout)
    assert pid > 1, f"{victim} has no process"
    log(f"kill -9 {victim} (pid {pid})")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    figures["restarted_by_policy"] = stack.wait_restarted(victim, timeout=RESTART_WAIT_S)
    if not figures["restarted_by_policy"]:
        # Podman 4.3 restarts a crashed container from conmon's exit command; seen here to
        # fail now and then (the container left "stopped", no restart, until a later podman
        # command noticed it). Then this script is the supervisor, and says so.
        log(f"podman did not restart {victim} within {RESTART_WAIT_S:.0f} s "
            "(its restart policy did not fire): starting it by hand")  # fmt: skip
        stack.pm.podman("start", victim)
    stack.until("chat after the worker was killed", stack.chat)
    figures["recovery_s"] = round(time.monotonic() - killed, 1)
    log(f"chat answers again {figures['recovery_s']:.0f} s after the kill")
    # The restarted worker's publisher sidecar (in its network namespace) relays again: a
    # prompt the router has never seen, so its expectation comes from the new events.
    overlap = stack.until("KV routing after the restart",
                          lambda: stack.kv_routing("a restarted worker"), timeout=60)  # fmt: skip
    log(f"KV routing after the restart: {overlap:.0%} of a repeated prompt expected cached")
    return figures


@contextmanager
def workdir() -> Iterator[Path]:
    (ROOT / ".run").mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="compose-test-", dir=ROOT / ".run"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_profiles(args: argparse.Namespace, pm: Podman, results: dict[str, Any]) -> None:
    """Build (unless --no-build), then each profile: up, exercise, tear down."""
    ensure_base(pm)
    if not args.no_build:
        results["build_s"] = build(pm)
    for profile in args.profile or ["agg", "disagg"]:
        stack = Stack(pm, profile, base64.b16encode(os.urandom(12)).decode().lower())
        stack.down()  # a previous run's leftovers
        try:
            up = stack.up()
            log(f"{profile}: every service up in {up:.0f} s")
            results["profiles"][profile] = {"up_s": round(up, 1), **exercise(stack)}
        except BaseException:
            for service in stack.services:
                print(stack.logs(service), flush=True)
            raise
        finally:
            if not args.keep:
                forced = stack.tear_down()
                if forced:
                    log(f"{profile}: down -v left {forced}: removed by force")
                    results["profiles"].setdefault(profile, {})["forced_down"] = forced
                log(f"{profile}: down, nothing left")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--profile",
        action="append",
        choices=sorted(VICTIM),
        help="profile to bring up (repeatable; default: agg and disagg)",
    )
    parser.add_argument(
        "--no-build",
        action="store_true",
        help="use the images already built (docker.io/sglmesh/<target>:latest)",
    )
    parser.add_argument("--keep", action="store_true", help="leave the last profile running")
    parser.add_argument("--fresh", action="store_true",
                        help="a private, empty image store (base image and every layer built "
                             "anew), deleted at the end")  # fmt: skip
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/compose_test.json",
                        help="where the timings go (JSON)")  # fmt: skip
    args = parser.parse_args()
    if args.fresh and (args.no_build or args.keep):
        parser.error("--fresh builds everything and deletes it: not with --no-build or --keep")
    for tool in ("podman", "buildah", "runc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"compose-test: no {tool} (apt-get install podman buildah runc)")
    if os.geteuid() != 0:
        raise SystemExit("compose-test: run as root (rootful podman with runc)")
    results: dict[str, Any] = {"profiles": {}}
    started = time.monotonic()
    with workdir() as path:
        pm = Podman(path, args.fresh)
        try:
            run_profiles(args, pm, results)
        finally:
            if args.fresh:
                pm.discard_store()
    results["total_s"] = round(time.monotonic() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
