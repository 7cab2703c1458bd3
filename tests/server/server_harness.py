"""Real uvicorn servers on 127.0.0.1, run in a background thread of the test process.

In-process, so a test can also look inside (the engine's KV pool, its waiting
queue) and hold the engine loop still with a `StepGate` where a test needs a
request to stay in flight: no test depends on how fast anything runs.
"""

import asyncio
from dataclasses import dataclass
import socket
import threading
import time
from typing import Callable

import httpx

API_KEY = "test-key"


@dataclass
class RunningServer:
    url: str
    app: object
    server: object
    thread: threading.Thread
    llm_engine: object  # the LLMEngine its engine thread runs; None with engine_core="process"
    engine_process: object = None  # the EngineProcess, with engine_core="process"

    @property
    def serving(self):
        return self.app.state.serving

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(model_path, served_name: str, max_model_len: int | None = None, num_kv_blocks: int = 256,
                 max_num_seqs: int = 8, engine_args: dict | None = None, engine_core: str = "thread",
                 **settings) -> RunningServer:
    from engine import EngineConfig, LLMEngine
    from server.app import build_app
    from server.engine_process import EngineProcess
    from server.runner import DrainingServer, uvicorn_config
    from server.serving import ServerSettings

    config = EngineConfig(model=str(model_path), max_model_len=max_model_len, num_kv_blocks=num_kv_blocks,
                          max_num_seqs=max_num_seqs, num_threads=1, **(engine_args or {}))
    settings.setdefault("api_key", API_KEY)
    llm_engine = LLMEngine(config) if engine_core == "thread" else None
    engine_process = EngineProcess(config) if engine_core == "process" else None
    app = build_app(llm_engine or engine_process, ServerSettings(served_model_name=served_name, **settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = DrainingServer(uvicorn_config(app, log_level="warning"), app, settings.get("shutdown_timeout_s", 30.0))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout_s=120, what="the server to start")
    return RunningServer(f"http://127.0.0.1:{port}", app, server, thread, llm_engine, engine_process)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 60.0, what: str = "a condition") -> None:
    """Polls; the timeout only bounds a hung test, it asserts nothing about speed."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class StepGate:
    """Lets the engine loop take only as many steps as the test allows."""

    def __init__(self, llm_engine):
        self.llm_engine = llm_engine
        self._step = llm_engine.step
        self._condition = threading.Condition()
        self._permits: int | None = None  # None: unlimited
        self.num_waiting_at_gate = 0
        llm_engine.step = self._gated_step

    def hold(self, permits: int = 0) -> None:
        with self._condition:
            self._permits = permits

    def open(self) -> None:
        with self._condition:
            self._permits = None
            self._condition.notify_all()

    def wait_blocked(self) -> None:
        wait_until(lambda: self.num_waiting_at_gate > 0, what="the engine loop to reach the gate")

    def _gated_step(self):
        with self._condition:
            self.num_waiting_at_gate += 1
            while self._permits == 0:
                self._condition.wait()
            self.num_waiting_at_gate -= 1
            if self._permits is not None:
                self._permits -= 1
        return self._step()

    def remove(self) -> None:
        self.open()
        self.llm_engine.step = self._step


def scrape(server: RunningServer) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def pool_is_free(llm_engine) -> bool:
    pool = llm_engine.kv_cache.pool
    return pool.num_free_blocks == pool.num_blocks
