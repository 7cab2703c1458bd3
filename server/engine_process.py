"""The engine core in a process of its own (`iterserve serve --engine-core process`, issue 10).

In one process the engine loop and the asyncio server share one interpreter, and each
waits on the other for the GIL: a step's host work slows streaming, and HTTP slows the
step. Here a spawned child builds the `LLMEngine` and runs `EngineCore` there, and the
front end keeps HTTP, tokenization, chat templates, streams and metrics.

Two one-way pipes (multiprocessing connections) join them:
- commands, front end to engine: each message a list of `Command`s, everything the inbox
  held, sent by a thread that waits on the inbox, so a child busy in a step never blocks
  the event loop on a full pipe;
- events, engine to front end: one message per `CoreListener` call, a step's outputs
  together (as rows of plain values, which pickle fast), read by a thread that makes the
  same listener calls an engine thread would.

The child leaves the front end's process group, so Ctrl+C in a terminal reaches only the
front end, which drains and then stops it; a plain SIGTERM still ends it (`join` uses one
when a stop takes too long). It stops as if told to when the front end's end of the
commands pipe closes (the front end died), and trims malloc's free pages once a minute as
the server does. If the child dies, the front end sees its sentinel and hears `died`:
every open stream gets an error, new requests a 503, and /health fails.
"""

from dataclasses import fields
import logging
import multiprocessing
from multiprocessing.connection import Connection, wait
from operator import attrgetter
import os
import threading
import time
from typing import Callable

from engine import LLMEngine, RequestOutput
from engine.config import EngineConfig
from scheduler.request import RequestTimes
from server.engine_core import STOP, Command, CoreListener, CoreOptions, EngineCore, EngineInfo
from server.errors import EngineError
from server.memory import TRIM_INTERVAL_S, frozen_startup_heap, release_free_memory

logger = logging.getLogger(__name__)

READY, FAILED, STOPPED = "ready", "failed", "stopped"
# The only names an event may call on the listener: a message is never an arbitrary attribute.
LISTENER_CALLS = frozenset({"took", "refused", "queued", "rejected", "stepped", "died"})
LOAD_POLL_S = 0.1


class EngineProcess:
    """Starts the engine process and waits until its model is loaded (or raises what it
    failed with), then runs like an `EngineThread`."""

    def __init__(self, config: EngineConfig):
        context = multiprocessing.get_context("spawn")  # a fork would copy this process's threads' locks
        commands_end, self._commands = context.Pipe(duplex=False)  # (the end that reads, the end that writes)
        self._events, events_end = context.Pipe(duplex=False)
        self._process = context.Process(
            target=run_engine_process, name="iterserve-engine", daemon=True,
            args=(config, commands_end, events_end, logging.getLogger().getEffectiveLevel()))
        self._process.start()
        commands_end.close()
        events_end.close()
        self.info = self._wait_until_loaded()
        self._sender: threading.Thread | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self._process.pid

    def _wait_until_loaded(self) -> EngineInfo:
        while not self._events.poll(LOAD_POLL_S):
            if not self._process.is_alive():
                break
        try:
            kind, payload = self._events.recv()
        except (EOFError, OSError):
            self._process.join()
            raise RuntimeError(f"the engine process exited with code {self._process.exitcode} "
                               "before its model was loaded") from None
        if kind == FAILED:
            self._process.join()
            error_type, message = payload
            raise (error_type if error_type in (FileNotFoundError, ValueError) else RuntimeError)(message)
        return payload

    def start(self, listener: CoreListener, take_commands: Callable[[float | None], list[Command]],
              options: CoreOptions) -> None:
        self._commands.send(options)
        self._reader = threading.Thread(target=self._read, args=(listener,), name="iterserve-engine-reader",
                                        daemon=True)
        self._sender = threading.Thread(target=self._send, args=(take_commands,), name="iterserve-engine-sender",
                                        daemon=True)
        self._reader.start()
        self._sender.start()

    def is_alive(self) -> bool:
        return self._process.is_alive() and self._reader is not None and self._reader.is_alive()

    def join(self, timeout_s: float) -> None:
        """After a STOP was sent: wait up to `timeout_s` for the process to end, then end it."""
        self._process.join(timeout_s)
        if self._process.is_alive():
            logger.warning("the engine process did not stop within %.0f s: killing it", timeout_s)
            self._process.kill()
            self._process.join()
        if self._reader is not None:
            self._reader.join(1.0)

    def close(self) -> None:
        """Stop it without a front end ever started (a start-up that failed after the load)."""
        self._commands.close()
        self.join(10.0)

    def _send(self, take_commands: Callable[[float | None], list[Command]]) -> None:
        while True:
            commands = take_commands(None)
            try:
                self._commands.send(commands)
            except OSError:  # the engine process is gone; the reader reports it
                return
            if any(kind == STOP for kind, _ in commands):
                self._commands.close()
                return

    def _read(self, listener: CoreListener) -> None:
        try:
            while True:
                # The sentinel too: a dead child's pipe may never end if something it forked holds it.
                if self._events not in wait([self._events, self._process.sentinel]):
                    break
                try:
                    kind, args = self._events.recv()
                except (EOFError, OSError):
                    break
                if kind == STOPPED:
                    return
                if kind == "stepped":
                    args = (unpack_outputs(args[0]), *args[1:])
                if kind in LISTENER_CALLS:
                    getattr(listener, kind)(*args)
                if kind == "died":
                    return
            self._process.join(1.0)
            error = EngineError(f"the engine process exited unexpectedly (exit code {self._process.exitcode})")
        except BaseException as failure:  # noqa: BLE001 - a message we cannot read must not leave streams hanging
            logger.exception("reading the engine process's messages failed")
            error = EngineError(f"the engine process's messages failed: {type(failure).__name__}: {failure}")
        listener.died(error)


class EventSender:
    """The CoreListener of the engine process: each call becomes one message to the front end."""

    def __init__(self, events: Connection):
        self.events = events

    def took(self, *args) -> None:
        self._send("took", args)

    def refused(self, *args) -> None:
        self._send("refused", args)

    def queued(self, *args) -> None:
        self._send("queued", args)

    def rejected(self, *args) -> None:
        self._send("rejected", args)

    def stepped(self, outputs: list[RequestOutput], *rest) -> None:
        self._send("stepped", (pack_outputs(outputs), *rest))

    def died(self, *args) -> None:
        self._send("died", args)

    def _send(self, kind: str, args: tuple) -> None:
        # If the front end is gone, the commands pipe has ended too, and the loop stops.
        send_quietly(self.events, (kind, args))


# A step's outputs cross as rows of plain values: pickling a list of small dataclasses took
# 1.7 ms for 256 of them, on the engine's own loop; these rows take a quarter of that.
_OUTPUT_FIELDS = tuple(f.name for f in fields(RequestOutput) if f.name != "times")
_output_row = attrgetter(*_OUTPUT_FIELDS)
_times_row = attrgetter(*(f.name for f in fields(RequestTimes)))


def pack_outputs(outputs: list[RequestOutput]) -> list[tuple]:
    return [(_output_row(output), _times_row(output.times)) for output in outputs]


def unpack_outputs(rows: list[tuple]) -> list[RequestOutput]:
    return [RequestOutput(**dict(zip(_OUTPUT_FIELDS, values)), times=RequestTimes(*times)) for values, times in rows]


def receive_commands(commands: Connection, timeout_s: float | None) -> list[Command]:
    """Every command sent, after waiting up to `timeout_s` (None: for ever) for the first; a
    STOP when the front end has gone."""
    taken: list[Command] = []
    try:
        if commands.poll(timeout_s):
            taken.extend(commands.recv())
            while commands.poll(0):
                taken.extend(commands.recv())
    except (EOFError, OSError):
        taken.append((STOP, None))
    return taken


def run_engine_process(config: EngineConfig, commands: Connection, events: Connection, log_level: int) -> None:
    """The engine process's main: load, say ready, run the core until a STOP, say stopped."""
    os.setpgid(0, 0)  # out of the terminal's process group: Ctrl+C is the front end's to handle
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    try:
        engine = LLMEngine(config)
    except Exception as error:  # noqa: BLE001 - the front end raises it where it started us
        send_quietly(events, (FAILED, (type(error), f"{error}" if isinstance(error, (FileNotFoundError, ValueError))
                                       else f"{type(error).__name__}: {error}")))
        return
    if not send_quietly(events, (READY, EngineInfo.of(engine))):
        return
    try:
        options = commands.recv()
    except (EOFError, OSError):  # the front end went before it started us
        return
    threading.Thread(target=trim_periodically, name="iterserve-trim", daemon=True).start()
    with frozen_startup_heap():
        EngineCore(engine, EventSender(events), options).run(lambda timeout_s: receive_commands(commands, timeout_s))
    send_quietly(events, (STOPPED, ()))


def send_quietly(events: Connection, message: tuple) -> bool:
    """Send, or False if the front end is gone."""
    try:
        events.send(message)
        return True
    except OSError:
        return False


def trim_periodically() -> None:
    while True:
        time.sleep(TRIM_INTERVAL_S)
        release_free_memory()
