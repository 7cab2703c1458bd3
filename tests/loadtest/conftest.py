"""A live iterserve on the tiny random Llama, as a subprocess: the load generator only sees its HTTP side."""

from dataclasses import dataclass
import os
from pathlib import Path
import socket
import subprocess
import sys
import time

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def bench_server(tiny_model_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("bench-server") / "server.log"
    command = [sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_model_path), "--port", str(port),
               "--served-model-name", "tiny", "--num-threads", "1", "--num-kv-blocks", "256",
               "--max-model-len", "512", "--max-num-seqs", "8", "--log-level", "warning"]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                                   env=os.environ | {"ITERSERVE_API_KEY": ""})
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until_serving(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_serving(server: ServerProcess, timeout_s: float = 180.0) -> None:
    """Polls; the timeout only bounds a hung start, it asserts nothing about speed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"the server exited with {server.process.returncode}:\n{server.log.read_text()}")
        try:
            if httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server did not start:\n{server.log.read_text()}")
