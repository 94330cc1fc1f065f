"""``TritonEngine``: relays to a Triton Inference Server (generation only).

Triton's LLM backends (vLLM, TensorRT-LLM) and custom Python-backend models all
take text in and stream text out, but they differ in tensor names, in how sampling
parameters arrive and in whether each streamed response holds the new text or all
text so far.  This engine speaks the vLLM-backend convention by default and makes
each of those differences an ``engine_args`` setting (docs/triton.md has recipes):

* ``protocol: grpc`` streams with ``stream_infer`` (one gRPC stream per request; it
  ends when a decoupled model sent its final response); ``protocol: http`` uses the
  ``generate_stream`` / ``generate`` extension (SSE) instead;
* ``sampling: json`` sends one ``sampling_parameters`` JSON string (vLLM backend);
  ``sampling: tensors`` sends one tensor per parameter (TensorRT-LLM ensemble);
* ``output_mode: delta`` (vLLM backend; TRT-LLM when streaming) passes text on as
  it comes; ``cumulative`` takes only what extends the text already seen;
* ``inputs`` / ``outputs`` rename tensors, ``extra_inputs`` adds constant ones,
  ``batch_dim`` adds the leading batch dimension of models with max_batch_size > 0.

Chat messages are rendered with the model's tokenizer (``tokenizer``) before they
reach Triton, and ``continuation`` is appended, so a stream the routed ingress
retries resumes where it broke.  With ``model_repository`` the replica starts ``tritonserver`` on its node
and stops it with itself; with ``url`` it uses a server the job already runs.  With
neither, it serves the tiny local model (serve_app.triton_models), as ZmqEngine does.

Errors: Triton's INVALID_ARGUMENT becomes ``EngineError`` (400, the client's fault);
anything else -- server gone, stream cut, model unavailable -- raises
``TritonUnavailable``, which the routed ingress retries on another replica; ``check_health``
fails once the server is dead so Serve replaces this replica.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from serve_app.engines.triton_requests import (
    TritonEngineArgs,
    decode_outputs,
    first_value,
    input_tensors,
    render_request_prompt,
    sampling_values,
)
from serve_app.framing import sse_lines
from serve_app.protocol import EngineError, GenerateDelta, GenerateRequest, Usage

log = logging.getLogger("hpcserve.engines.triton")


class TritonUnavailable(ConnectionError):
    """The server is gone or failed: retry elsewhere (the ingress does, as a RayError)."""


class TritonEngine:
    def __init__(self, model_name: str, args: TritonEngineArgs, task: str = "generate"):
        self.model_name = model_name
        self.args = args
        self.triton_model = args.triton_model or model_name
        self.server = None
        tokenizer = args.tokenizer
        if args.url is None:
            from serve_app.triton_models.launch import TritonServerProcess
            repository = args.model_repository
            run_dir = None
            if repository is None:  # the tiny model, like ZmqEngine's default
                import tempfile

                from serve_app.tiny_model import ensure_tiny_model
                from serve_app.triton_models.repository import write_tiny_repository
                run_dir = Path(tempfile.mkdtemp(prefix="hpcserve-triton-"))
                tokenizer = tokenizer or str(ensure_tiny_model())
                repository = write_tiny_repository(run_dir / "repository", tokenizer)
                self.triton_model = args.triton_model or "tiny_llm"
            self.server = TritonServerProcess.spawn(
                repository, binary=args.binary, host=args.host, http_port=args.http_port,
                grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                backend_directory=args.backend_directory, python_env=args.python_env,
                extra_args=args.server_args, env=args.server_env, run_dir=run_dir,
                startup_timeout=args.startup_timeout_s)
            self.url = self.server.grpc_url if args.protocol == "grpc" else self.server.http_url
        else:
            self.url = args.url.removeprefix("http://")
        self.tokenizer = None
        if tokenizer is not None:
            from transformers import AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.max_model_len = args.max_model_len or _context_length(tokenizer, self.tokenizer)
        self._grpc = self._http = None
        try:
            self._wait_ready(args.startup_timeout_s)
        except BaseException:
            self.shutdown()  # the deployment never got to own it
            raise

    # ---- the engine interface ------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[GenerateDelta]]:
        prompt, n_prompt, n_client_prompt = render_request_prompt(
            request, self.tokenizer, self.model_name, self.max_model_len)
        max_tokens = request.sampling.max_tokens
        if max_tokens is None and self.max_model_len and n_prompt is not None:
            max_tokens = self.max_model_len - n_prompt
        values = sampling_values(self.args, request, max_tokens)
        responses = (self._grpc_stream if self.args.protocol == "grpc" else self._http_stream)(
            request.request_id, input_tensors(self.args, prompt, values))
        seen, count, counted, finish, reported = "", 0, False, None, False
        async for out in responses:
            text = out.get("text_output") or ""
            if self.args.output_mode == "cumulative" and text.startswith(seen):
                text, seen = text[len(seen):], text
            else:
                seen += text
            if "num_output_tokens" in out:  # exact, from the backend
                n, counted = int(out["num_output_tokens"]) - count, True
            else:  # streaming backends send about one token per response
                n = 1 if text else 0
            count += n
            finish = out.get("finish_reason") or finish
            if text or n:
                # the first delta tells the prompt's size up front (continuous usage)
                usage = Usage(n_client_prompt, count) if not reported else None
                reported = True
                yield [GenerateDelta(text=text, num_tokens=n, usage=usage)]
        if not counted and not self.args.stream and self.tokenizer is not None:
            count = len(self.tokenizer(seen, add_special_tokens=False)["input_ids"])
        if finish not in ("stop", "length", "abort"):
            finish = "length" if max_tokens is not None and count >= max_tokens else "stop"
        yield [GenerateDelta(finish_reason=finish, usage=Usage(n_client_prompt, count))]

    async def model_info(self) -> dict[str, Any]:
        return {"model": self.model_name, "max_model_len": self.max_model_len,
                "engine": "triton", "engine_model": self.triton_model, "url": self.url,
                "protocol": self.args.protocol}

    async def check_health(self) -> None:
        if self.server is not None and not self.server.alive():
            raise TritonUnavailable(f"tritonserver pid {self.server.pid} exited with "
                                    f"{self.server.process.returncode}:\n{self.server.log_tail(10)}")
        if not await self._ready():
            raise TritonUnavailable(f"Triton at {self.url}: server or model "
                                    f"{self.triton_model!r} not ready")

    async def stats(self) -> dict[str, Any]:
        return {"url": self.url, "server_pid": self.server.pid if self.server else None,
                "triton_model": self.triton_model}

    def shutdown(self) -> None:
        """Stop the server this replica started (one given by url stays)."""
        server, self.server = getattr(self, "server", None), None
        if server is not None:
            server.stop()

    # ---- transports -------------------------------------------------------------
    async def _grpc_stream(self, rid: str, tensors) -> AsyncIterator[dict[str, Any]]:
        import grpc
        import tritonclient.grpc.aio as grpcclient
        from tritonclient.utils import InferenceServerException
        if self._grpc is None:  # created lazily: it belongs to the replica's event loop
            self._grpc = grpcclient.InferenceServerClient(self.url)
        inputs = []
        for name, (array, dtype) in tensors.items():
            array = array[None] if self.args.batch_dim else array
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)

        async def requests():
            yield {"model_name": self.triton_model, "inputs": inputs, "request_id": rid}

        # triton_grpc_error (Triton >= 24.09): an error ends the stream with its gRPC
        # status; without it only the message travels and a bad request looks like
        # a broken server.
        stream = self._grpc.stream_infer(requests(), stream_timeout=self.args.request_timeout_s,
                                         headers={"triton_grpc_error": "true"})
        try:
            async for result, error in stream:
                if error is not None:
                    raise _classify(str(error), error.status())
                yield decode_outputs(self.args, lambda n: first_value(result.as_numpy(n)))
        except InferenceServerException as exc:
            raise _classify(str(exc), exc.status()) from None
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise _classify(exc.details() or "", "INVALID_ARGUMENT") from None
            # the stream itself broke: server gone
            raise TritonUnavailable(f"Triton at {self.url}: stream failed: {exc.code()} "
                                    f"{exc.details()}") from None
        finally:
            stream.cancel()  # no-op when finished; aborts the request when the client left

    async def _http_stream(self, rid: str, tensors) -> AsyncIterator[dict[str, Any]]:
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=f"http://{self.url}",
                                           timeout=self.args.request_timeout_s)
        body: dict[str, Any] = {"id": rid}
        for name, (array, _) in tensors.items():
            value = array.tolist()
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
            body[name] = value[0] if len(value) == 1 and not self.args.batch_dim else value
        endpoint = "generate_stream" if self.args.stream else "generate"
        try:
            async with self._http.stream("POST", f"/v2/models/{self.triton_model}/{endpoint}",
                                         json=body) as reply:
                if reply.status_code != 200:
                    raw = (await reply.aread()).decode(errors="replace")
                    raise _classify(_error_text(raw), str(reply.status_code))
                if not self.args.stream:
                    yield self._decode_json(json.loads(await reply.aread()))
                    return
                async for line in sse_lines(reply.aiter_bytes()):
                    if line.startswith("data:"):
                        yield self._decode_json(json.loads(line[5:]))
        except httpx.HTTPError as exc:
            raise TritonUnavailable(f"Triton at {self.url}: {type(exc).__name__}: {exc}") from None

    def _decode_json(self, data: dict[str, Any]) -> dict[str, Any]:
        if "error" in data:
            raise _classify(str(data["error"]), "")
        return decode_outputs(self.args, lambda n: first_value(data.get(n)))

    async def _ready(self) -> bool:
        try:
            if self.args.protocol == "grpc":
                import tritonclient.grpc.aio as grpcclient
                if self._grpc is None:
                    self._grpc = grpcclient.InferenceServerClient(self.url)
                return (await self._grpc.is_server_ready(client_timeout=5)
                        and await self._grpc.is_model_ready(self.triton_model, client_timeout=5))
            if self._http is None:
                self._http = httpx.AsyncClient(base_url=f"http://{self.url}",
                                               timeout=self.args.request_timeout_s)
            server = await self._http.get("/v2/health/ready", timeout=5)
            model = await self._http.get(f"/v2/models/{self.triton_model}/ready", timeout=5)
            return server.status_code == 200 and model.status_code == 200
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            log.debug("readiness check of %s failed: %r", self.url, exc)
            return False

    def _wait_ready(self, timeout: float) -> None:
        """Block start-up until the server and model are ready (a job's server may lag).

        Synchronous clients on purpose: the constructor may run inside Serve's event
        loop, where neither ``asyncio.run`` nor the replica's async clients can be used.
        """
        import time
        import urllib.request

        def ready() -> bool:
            try:
                if self.args.protocol == "grpc":
                    import tritonclient.grpc as grpcclient
                    client = grpcclient.InferenceServerClient(self.url)
                    try:
                        return client.is_server_ready(client_timeout=5) and \
                            client.is_model_ready(self.triton_model, client_timeout=5)
                    finally:
                        client.close()
                for path in ("/v2/health/ready", f"/v2/models/{self.triton_model}/ready"):
                    with urllib.request.urlopen(f"http://{self.url}{path}", timeout=5) as reply:
                        if reply.status != 200:
                            return False
                return True
            except Exception:  # noqa: BLE001 - not up yet
                return False

        deadline = time.monotonic() + timeout
        while not ready():
            if self.server is not None and not self.server.alive():
                raise RuntimeError(f"tritonserver exited:\n{self.server.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Triton at {self.url}: model {self.triton_model!r} "
                                   f"not ready after {timeout:g}s")
            time.sleep(1.0)


def _error_text(raw: str) -> str:
    try:
        return str(json.loads(raw).get("error", raw))
    except (ValueError, AttributeError):
        return raw


def _classify(message: str, status: str | None) -> Exception:
    """INVALID_ARGUMENT / HTTP 400 is the request's fault; everything else is the server's."""
    if status and ("INVALID_ARGUMENT" in status or status == "400"):
        return EngineError(f"Triton rejected the request: {message}", status=400,
                           code="invalid_request")
    return TritonUnavailable(f"Triton request failed ({status or 'error'}): {message}")


def _context_length(path: str | None, tokenizer: Any) -> int | None:
    """From the model's config.json next to the tokenizer, else the tokenizer's limit."""
    if path is not None and (Path(path) / "config.json").is_file():
        config = json.loads((Path(path) / "config.json").read_text())
        for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            if isinstance(config.get(key), int):
                return config[key]
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**7 else None
