"""A kubelet for worker pods, played with local processes.

kwok marks pods Running but runs nothing. The autoscaling benchmark runs real
workers on kwok nodes (the dev cluster's one real node, which the tests use,
has room for a few pods only): :class:`LocalKubelet` starts each Running pod's worker container
as a local process, with the environment a kubelet would resolve, and treats a
pod that is deleted (or being deleted) as the kubelet does: SIGTERM to the
container's process, SIGKILL when the pod's ``terminationGracePeriodSeconds``
has passed. The pod stays Terminating until its process has exited (the dev
cluster's kwok leaves pods with the annotation ``pgw-test/local-kubelet``
alone), so the operator sees what it would see with a real kubelet.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from kubernetes import client

from prefect_gpu_workers.server import free_port

from .operator_harness import Pools

# kwok's pod-delete stage skips pods that carry it (hack/dev-cluster.d/kwok.yaml).
ANNOTATION = "pgw-test/local-kubelet"


def kubelet_env(pools: Pools, pod: client.V1Pod, volumes: dict[str, Path]) -> dict[str, str]:
    """The worker container's environment as the kubelet would resolve it.

    Downward-API fields and Secret references are resolved from the API server;
    volume mount paths map to local directories (``volumes``).
    """
    raw = pools.core.api_client.sanitize_for_serialization(pod)
    (container,) = [c for c in raw["spec"]["containers"] if c["name"] == "worker"]
    fields = {"metadata.name": raw["metadata"]["name"],
              "metadata.namespace": raw["metadata"]["namespace"],
              "spec.nodeName": raw["spec"].get("nodeName", "")}  # fmt: skip
    env: dict[str, str] = {}
    for item in container.get("env", []):
        source = item.get("valueFrom")
        if source is None:
            value = item.get("value", "")
        elif "fieldRef" in source:
            value = fields[source["fieldRef"]["fieldPath"]]
        else:
            ref = source["secretKeyRef"]
            secret = pools.core.read_namespaced_secret(ref["name"], pools.namespace)
            value = base64.b64decode((secret.data or {})[ref["key"]]).decode()
        for mount in container.get("volumeMounts", []):
            if value == mount["mountPath"]:
                value = str(volumes[mount["name"]])
        env[item["name"]] = value
    return env


@dataclass
class LocalContainer:
    """One pod's worker container, as a local process."""

    pod: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    grace_s: float
    log_file: IO[bytes]
    term_at: float | None = None  # when SIGTERM was sent
    exit_code: int | None = None
    removed: bool = False  # its pod deleted for good, after the process exited

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class LocalKubelet:
    """Runs one pool's worker pods as local processes until :meth:`stop`."""

    pools: Pools
    pool: str
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)  # added to every container's
    interval_s: float = 0.25
    containers: dict[str, LocalContainer] = field(default_factory=dict)
    _thread: threading.Thread | None = None
    _running: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> LocalKubelet:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="local-kubelet", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while self._running:
            with contextlib.suppress(client.ApiException, OSError):
                self.sync()
            time.sleep(self.interval_s)

    def sync(self) -> None:
        """One pass: start Running pods; for deleted ones SIGTERM, SIGKILL after the
        grace period, and remove the pod once its process has exited."""
        with self._lock:
            listed: set[str] = set()
            deleting: set[str] = set()
            for pod in self.pools.pods(self.pool):
                assert pod.metadata is not None
                assert pod.status is not None
                name = str(pod.metadata.name)
                listed.add(name)
                if pod.metadata.deletion_timestamp is not None:
                    deleting.add(name)
                elif pod.status.phase == "Running" and name not in self.containers:
                    self.containers[name] = self._run(pod)
            now = time.monotonic()
            for container in self.containers.values():
                if container.exit_code is None and (code := container.proc.poll()) is not None:
                    container.exit_code = code
                    container.log_file.close()
                stopping = container.pod in deleting or container.pod not in listed
                term_at = container.term_at
                overdue = term_at is not None and now - term_at > container.grace_s
                if container.exit_code is None:
                    if stopping and term_at is None:
                        container.term_at = now
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(container.proc.pid, signal.SIGTERM)
                    elif overdue:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(container.proc.pid, signal.SIGKILL)
                elif container.pod in deleting and not container.removed:
                    self._remove(container.pod)
                    container.removed = True

    def _remove(self, pod: str) -> None:
        """Delete the pod for good, as the kubelet does once its containers have stopped."""
        with contextlib.suppress(client.ApiException):
            self.pools.core.delete_namespaced_pod(pod, self.pools.namespace, grace_period_seconds=0)

    def _run(self, pod: client.V1Pod) -> LocalContainer:
        assert pod.metadata is not None
        assert pod.spec is not None
        name = str(pod.metadata.name)
        volumes = {"prefect-home": self.workdir / name / "home", "tmp": self.workdir / name / "tmp"}
        for path in volumes.values():
            path.mkdir(parents=True, exist_ok=True)
        env = kubelet_env(self.pools, pod, volumes)
        # Each pod has its own network namespace; one host has one: remap the port.
        env["PREFECT_WORKER_WEBSERVER_PORT"] = str(free_port())
        env |= {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "HOME": str(volumes["tmp"]), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                **self.env}  # fmt: skip
        # Before the process starts: from now on kwok leaves this pod's deletion to us.
        self.pools.core.patch_namespaced_pod(
            name, self.pools.namespace, {"metadata": {"annotations": {ANNOTATION: "true"}}}
        )
        (container,) = [c for c in pod.spec.containers if c.name == "worker"]
        command = [*(container.command or []), *(container.args or [])]
        assert command[:2] == ["prefect-gpu-workers", "worker"], command
        log_path = self.workdir / f"{name}.log"
        log_file = log_path.open("wb")
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        grace = float(pod.spec.termination_grace_period_seconds or 0)
        return LocalContainer(name, proc, log_path, grace, log_file)

    def running(self) -> list[str]:
        """Pods whose container runs and has not been told to stop."""
        with self._lock:
            return [c.pod for c in self.containers.values()
                    if c.exit_code is None and c.term_at is None]  # fmt: skip

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop the loop, then every container: SIGTERM, SIGKILL after ``grace_s``."""
        self._running = False
        if self._thread is not None:
            self._thread.join(10)
        for container in self.containers.values():
            if container.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(container.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for container in self.containers.values():
            try:
                container.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(container.proc.pid, signal.SIGKILL)
                container.proc.wait(10)
            if not container.log_file.closed:
                container.log_file.close()
            # Hand what is left of the pods back to kwok, which deletes them as it does others.
            with contextlib.suppress(client.ApiException):
                self.pools.core.patch_namespaced_pod(
                    container.pod, self.pools.namespace,
                    {"metadata": {"annotations": {ANNOTATION: None}}},
                )  # fmt: skip
                if container.term_at is not None:
                    self._remove(container.pod)

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- worker {c.pod} (exit {c.proc.returncode}) ---\n{c.log()[-tail:]}"
                         for c in self.containers.values())  # fmt: skip
