"""A Triton Python-backend model that streams a transformers causal LM, token by token.

Why it exists: hpcserve's ``TritonEngine`` must be testable against the real Triton
server binary without a GPU, vLLM or TensorRT-LLM.  This model speaks the tensor
convention of Triton's vLLM backend, so the engine settings that drive it are the
ones an operator uses for the real backend:

* inputs: ``text_input`` (BYTES), ``stream`` (BOOL), ``sampling_parameters`` (BYTES,
  JSON: max_tokens, temperature, top_p, seed, stop, ignore_eos),
  ``exclude_input_in_output`` (BOOL), ``return_finish_reason`` /
  ``return_num_input_tokens`` / ``return_num_output_tokens`` (BOOL);
* outputs: ``text_output`` (BYTES), and when asked: ``finish_reason``,
  ``num_input_tokens``, ``num_output_tokens``.

Decoupled: with ``stream`` true it sends one response per generated token carrying
the *new* text (what current vLLM backends send); the optional input
``cumulative_output`` (an hpcserve test knob) makes each response carry all text so
far instead, which is how some TensorRT-LLM setups stream, so the engine's
``output_mode: cumulative`` can be tested too.

Generation is plain ``model.generate`` (greedy when temperature is 0), so its output
is exactly what transformers produces for the same prompt.  Each request runs in
its own thread; ``execute`` returns at once, as decoupled models must.
"""

import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils


def _scalar(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else value


class _Cancelled(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_threads", "1")))
        path = params["model_path"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        self.max_model_len = self.model.config.max_position_embeddings
        self.torch = torch
        self.lock = threading.Lock()  # seeded sampling uses the global RNG
        self.threads = set()

    def execute(self, requests):
        for request in requests:
            thread = threading.Thread(target=self._serve, args=(request,), daemon=True)
            self.threads.add(thread)
            thread.start()
        return None

    def finalize(self):
        for thread in list(self.threads):
            thread.join(timeout=5)

    # ---- one request ---------------------------------------------------------
    def _serve(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            self._generate(request, sender)
        except _Cancelled:
            sender.send(flags=final)
        except Exception as exc:  # noqa: BLE001 - every error must reach the client
            code = getattr(pb_utils.TritonError, "INVALID_ARG" if isinstance(exc, ValueError)
                           else "INTERNAL", None)
            error = pb_utils.TritonError(str(exc), code) if code is not None \
                else pb_utils.TritonError(str(exc))
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), flags=final)
        finally:
            self.threads.discard(threading.current_thread())

    def _generate(self, request, sender):
        prompt = _scalar(request, "text_input")
        if prompt is None:
            raise ValueError("text_input is required")
        stream = bool(_scalar(request, "stream", False))
        exclude_input = bool(_scalar(request, "exclude_input_in_output", False))
        cumulative = bool(_scalar(request, "cumulative_output", False))
        want = {name: bool(_scalar(request, f"return_{name}", False))
                for name in ("finish_reason", "num_input_tokens", "num_output_tokens")}
        try:
            sampling = json.loads(_scalar(request, "sampling_parameters", "{}") or "{}")
        except json.JSONDecodeError as err:
            raise ValueError(f"sampling_parameters is not valid JSON: {err}") from None
        prompt_ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        n_prompt = prompt_ids.shape[1]
        max_tokens = int(sampling.get("max_tokens", 16))
        if max_tokens < 1 or n_prompt + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds "
                             f"the context length {self.max_model_len}")
        temperature = float(sampling.get("temperature", 1.0))
        stops = sampling.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)

        state = {"ids": [], "text": "", "sent": 0, "finish": None}

        def respond(text, finish=None, flags=0):
            tensors = [pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_))]
            if want["finish_reason"]:
                tensors.append(pb_utils.Tensor(
                    "finish_reason", np.array([(finish or "").encode()], dtype=np.object_)))
            if want["num_input_tokens"]:
                tensors.append(pb_utils.Tensor("num_input_tokens",
                                               np.array([n_prompt], dtype=np.uint32)))
            if want["num_output_tokens"]:
                tensors.append(pb_utils.Tensor("num_output_tokens",
                                               np.array([len(state["ids"])], dtype=np.uint32)))
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)

        def on_token(token):
            """Called per new token; returns True to stop (stop string or cancelled)."""
            if sender.is_cancelled():
                raise _Cancelled()
            state["ids"].append(token)
            text = self.tokenizer.decode(state["ids"], skip_special_tokens=True)
            for stop in stops:
                cut = text.find(stop)
                if cut >= 0:
                    state["text"], state["finish"] = text[:cut], "stop"
                    return True
            # hold back a trailing partial UTF-8 sequence and any possible stop prefix
            safe = len(text.rstrip("\ufffd"))
            for stop in stops:
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:k]):
                        safe -= k
                        break
            state["text"] = text
            if stream and safe > state["sent"]:
                respond(text[:safe] if cumulative else text[state["sent"]:safe])
                state["sent"] = safe
            return False

        self._run(prompt_ids, max_tokens, temperature, sampling, on_token)
        n_out = len(state["ids"])
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        finish = state["finish"] or ("stop" if n_out and state["ids"][-1] in eos
                                     and not sampling.get("ignore_eos") else "length")
        text = state["text"]
        if stream:
            rest = text if cumulative else text[state["sent"]:]
        else:
            rest = text if exclude_input else prompt + text
        respond(rest, finish, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _run(self, prompt_ids, max_tokens, temperature, sampling, on_token):
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        stopped = {"flag": False}

        class Streamer(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # generate() first pushes the prompt
                    self.first = False
                    return
                if not stopped["flag"]:
                    stopped["flag"] = on_token(int(value.reshape(-1)[0]))

            def end(self):
                pass

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return self_torch.full((input_ids.shape[0],), stopped["flag"], dtype=self_torch.bool)

        self_torch = self.torch
        kwargs = dict(max_new_tokens=max_tokens, streamer=Streamer(),
                      stopping_criteria=StoppingCriteriaList([Stop()]),
                      attention_mask=self_torch.ones_like(prompt_ids),
                      pad_token_id=self.tokenizer.pad_token_id)
        if sampling.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_tokens
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature,
                          top_p=float(sampling.get("top_p", 1.0)), top_k=0)
        else:
            kwargs.update(do_sample=False)
        with self_torch.inference_mode():
            if temperature > 0 and sampling.get("seed") is not None:
                with self.lock:
                    self_torch.manual_seed(int(sampling["seed"]))
                    self.model.generate(prompt_ids, **kwargs)
            else:
                self.model.generate(prompt_ids, **kwargs)
