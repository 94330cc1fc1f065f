"""The ZMQ engine process: a ROUTER socket in front of a ``Batcher``.

Run ``python -m serve_app.zmq_engine.server --model DIR --bind tcp://127.0.0.1:PORT``.
Any model directory that ``AutoModelForCausalLM`` loads works; with ``--task embed``
one that ``AutoModel`` loads, served by an ``Embedder`` (pooling as its
sentence-transformers config says).  The wire protocol is documented in
``serve_app.zmq_engine.wire``.

Two threads, because a decode step must never wait for the network and a health
check must never wait for a decode step: the main thread owns the ROUTER socket
(ZeroMQ sockets are single-threaded) and answers control messages at once; the
generation thread owns the batcher and sends its deltas back through an inproc
PUSH/PULL pipe that the main thread forwards.  Chat templating happens here, in the
engine, with the model's own tokenizer, so clients send OpenAI messages as they are.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import zmq

from serve_app.processes import pid_alive
from serve_app.protocol import EngineError
from serve_app.zmq_engine import wire

log = logging.getLogger("hpcserve.zmq_engine")

_POLL_MS = 100
EXIT_ADDRESS_IN_USE = 3


class EngineServer:
    """Serves one batcher on a bound ROUTER socket until ``stop()``."""

    def __init__(self, router: zmq.Socket, context: zmq.Context, model_name: str):
        self._router = router
        self._context = context
        self.model_name = model_name
        self.batcher: Any = None  # set by ``serve``; control replies say "loading" until then
        self._inbox: queue.SimpleQueue[tuple[str, bytes, dict[str, Any]]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._pipe = f"inproc://hpcserve-deltas-{id(self)}"
        self._pull = context.socket(zmq.PULL)
        self._pull.bind(self._pipe)
        self._generation: threading.Thread | None = None

    def stop(self) -> None:
        self._stop.set()

    def generation_alive(self) -> bool:
        return self._generation is not None and self._generation.is_alive()

    def serve(self, batcher: Any, watch_pid: int | None = None) -> None:
        """Run until ``stop()`` (or until ``watch_pid`` is gone: no orphaned engines)."""
        self.batcher = batcher
        self._generation = threading.Thread(target=self._generation_loop, name="generation",
                                            daemon=True)
        self._generation.start()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        next_watch = 0.0
        while not self._stop.is_set():
            ready = dict(poller.poll(_POLL_MS))
            if self._pull in ready:
                self._forward_deltas()
            if self._router in ready:
                self._receive()
            if watch_pid is not None and time.monotonic() >= next_watch:
                next_watch = time.monotonic() + 1.0
                if not pid_alive(watch_pid):
                    log.warning("process %d is gone; stopping", watch_pid)
                    self._stop.set()
        self._generation.join(timeout=10)
        self._forward_deltas()  # the generation thread's last words (shutdown errors)
        self._pull.close(linger=0)

    # -- main thread: the socket ------------------------------------------------------

    def _receive(self) -> None:
        while True:
            try:
                identity, frame = self._router.recv_multipart(zmq.NOBLOCK)[:2]
            except zmq.Again:
                return
            except ValueError:  # a peer that sent a multipart message without a payload
                continue
            try:
                message = wire.decode(frame)
            except wire.WireError as exc:
                self._reply(identity, wire.error_message(None, str(exc), status=400))
                continue
            self._handle(identity, message)

    def _handle(self, identity: bytes, message: dict[str, Any]) -> None:
        kind, rid = message["type"], message.get("request_id")
        if kind in (wire.SUBMIT, wire.EMBED, wire.ABORT):
            self._inbox.put((kind, identity, message))
        elif kind == wire.HEALTH:
            ok, detail = self._health()
            self._reply(identity, {"type": wire.HEALTH_OK, "request_id": rid, "ok": ok,
                                   "detail": detail})
        elif kind == wire.STATS:
            stats = self.batcher.stats() if self.batcher is not None else {}
            self._reply(identity, {"type": wire.STATS_REPLY, "request_id": rid, "stats": stats})
        elif kind == wire.INFO:
            self._reply(identity, {
                "type": wire.INFO_REPLY, "request_id": rid, "model": self.model_name,
                "max_model_len": self.batcher.max_model_len if self.batcher else None,
                "task": getattr(self.batcher, "task", "generate"),
                "dimensions": getattr(self.batcher, "dimensions", None),
                "protocol_version": wire.PROTOCOL_VERSION})
        else:
            self._reply(identity, wire.error_message(rid, f"unknown message type {kind!r}",
                                                     status=400, param="type"))

    def _health(self) -> tuple[bool, str]:
        if self._generation is None:
            return False, "loading"
        if not self._generation.is_alive():
            return False, "the generation loop died"
        return True, ""

    def _reply(self, identity: bytes, message: dict[str, Any]) -> None:
        self._router.send_multipart([identity, wire.encode(message)])

    def _forward_deltas(self) -> None:
        while True:
            try:
                frames = self._pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._router.send_multipart(frames)

    # -- generation thread ------------------------------------------------------------

    def _generation_loop(self) -> None:
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect(self._pipe)
        batcher = self.batcher
        try:
            while not self._stop.is_set():
                self._take_inbox(push, block=not batcher.has_work())
                if not batcher.has_work():
                    continue
                try:
                    events = batcher.step()
                except Exception:
                    log.error("decode step failed:\n%s", traceback.format_exc())
                    self._fail(push, batcher.fail_all(), "the engine failed during generation", 500)
                    continue
                for (identity, rid), event in events:
                    push.send_multipart([identity, wire.encode(wire.event_message(rid, event))])
            self._fail(push, batcher.fail_all(), "the engine is shutting down", 503)
        finally:
            push.close(linger=1000)

    def _take_inbox(self, push: zmq.Socket, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=_POLL_MS / 1000) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, identity, message = item
            rid = str(message.get("request_id"))
            key: Hashable = (identity, rid)
            if kind == wire.ABORT:
                for _, event in self.batcher.abort(key):
                    push.send_multipart([identity, wire.encode(wire.event_message(rid, event))])
            else:
                self._submit(push, key, kind, message)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _submit(self, push: zmq.Socket, key: tuple[bytes, str], kind: str,
                message: dict[str, Any]) -> None:
        identity, rid = key
        task = getattr(self.batcher, "task", "generate")
        try:
            if (kind == wire.EMBED) != (task == "embed"):
                raise EngineError(f"this engine serves task '{task}': it takes "
                                  f"{'embed' if task == 'embed' else 'submit'} messages",
                                  status=400, param="type", code="unsupported_task")
            request = (wire.embed_request_from_message if kind == wire.EMBED
                       else wire.request_from_submit)(message, self.model_name)
            self.batcher.add(key, request)
        except EngineError as exc:
            error = wire.error_message(rid, exc.message, status=exc.status, param=exc.param,
                                       code=exc.code)
            push.send_multipart([identity, wire.encode(error)])
        except ValueError as exc:  # pydantic validation of the submit frame
            error = wire.error_message(rid, f"invalid submit: {exc}", status=400,
                                       code="invalid_request")
            push.send_multipart([identity, wire.encode(error)])

    def _fail(self, push: zmq.Socket, keys: list[Hashable], message: str, status: int) -> None:
        for identity, rid in keys:
            error = wire.error_message(rid, message, status=status, code="engine_error")
            push.send_multipart([identity, wire.encode(error)])


def _load(model_dir: str, dtype_name: str, max_batch: int, max_model_len: int | None,
          task: str = "generate"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve_app.zmq_engine.batcher import Batcher

    dtype = "auto" if dtype_name == "auto" else getattr(torch, dtype_name)
    if task == "embed":
        from serve_app.zmq_engine.embedder import load_embedder
        return load_embedder(model_dir, dtype, max_batch, max_model_len)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return Batcher(model, tokenizer, max_batch=max_batch, max_model_len=max_model_len)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="hpcserve's ZeroMQ engine process")
    parser.add_argument("--model", required=True, help="a model directory transformers loads")
    parser.add_argument("--bind", required=True, help="ZeroMQ endpoint, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="sequences decoded together; inputs per embedding forward pass")
    parser.add_argument("--task", default="generate", choices=["generate", "embed"])
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--model-name", default=None, help="default: the model dir's name")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                        help="float32 by default: CPUs without bf16 units run it fastest")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--watch-pid", type=int, default=None, help="exit when this process is gone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    stopping = threading.Event()
    server: EngineServer | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()
        if server is not None:
            server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # Bind before loading the model: a busy port fails in a second, not after the load,
    # and health checks sent during the load are queued and answered once serving.
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.SNDHWM, 0)  # never drop a delta for a slow client
    router.setsockopt(zmq.RCVHWM, 0)
    try:
        router.bind(args.bind)
    except zmq.ZMQError as exc:
        print(f"cannot bind {args.bind}: {exc}", file=sys.stderr)
        return EXIT_ADDRESS_IN_USE if exc.errno == zmq.EADDRINUSE else 2
    server = EngineServer(router, context, args.model_name or Path(args.model).name)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    batcher = _load(args.model, args.dtype, args.max_batch, args.max_model_len, args.task)
    if stopping.is_set():
        return 0
    log.info("serving %s (%s) on %s (max_batch=%d, max_model_len=%d)", args.model, args.task,
             args.bind, args.max_batch, batcher.max_model_len)
    server.serve(batcher, watch_pid=args.watch_pid)
    if server.generation_alive():  # stuck in a forward pass: don't hang in context.term()
        log.error("the generation thread did not stop; exiting hard")
        os._exit(1)
    router.close(linger=500)  # let the shutdown errors reach the clients
    context.term()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
