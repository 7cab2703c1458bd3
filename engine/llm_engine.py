"""The engine loop: each step schedules, executes, updates and emits outputs."""

from dataclasses import dataclass
import gc
import logging
import time
import uuid

import torch

from engine import host
from engine.attention import select_backend
from engine.config import EngineConfig
from engine.detokenizer import RequestText
from engine.loader import (
    kv_cache_dtype_name, linear_path, load_model, resolve_device, resolve_dtype, resolve_kv_cache_dtype,
    resolve_model_path,
)
from engine.model_runner import LaunchedStep, ModelRunner, StepResult, kv_bytes_per_block
from engine.outputs import RequestOutput
from engine.sampler import TokenLogprobs
from engine.structured_output import StructuredOutputs
from kvcache import KVCacheManager
from scheduler import (
    InvalidRequestError, Request, RequestStatus, SamplingParams, Scheduler, SchedulerOutput, StepShape,
)
from scheduler.cost_model import load_cost_model

logger = logging.getLogger(__name__)

# How long a step with nothing to run waits for a grammar to compile before it returns (and the
# engine loop takes any new requests).
GRAMMAR_WAIT_S = 0.05


@dataclass(slots=True)
class InFlightStep:
    """Async scheduling: a step launched on the device and not yet read back."""

    plan: SchedulerOutput
    launched: LaunchedStep
    shape: StepShape  # taken at launch, before the scheduler moves the plan's requests on

    @property
    def needs_tokens(self) -> bool:
        """Whether the next step's sampling needs this step's tokens on the host (penalties, and
        a structured output's grammar, which must follow each token before it can mask the next)."""
        return any(s.samples and (s.request.sampling_params.has_penalties
                                  or s.request.sampling_params.structured_output is not None)
                   for s in self.plan.scheduled)


def check_prompt(token_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """InvalidRequestError unless `token_ids` is a prompt this model can take."""
    if not token_ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    if any(not isinstance(t, int) or t < 0 or t >= vocab_size for t in token_ids):
        raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab_size})", param="prompt")
    if len(token_ids) >= max_model_len:
        raise InvalidRequestError(
            f"the prompt has {len(token_ids)} tokens; this model's context is {max_model_len} tokens "
            "including at least one generated token",
            param="prompt", code="context_length_exceeded",
        )


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    """InvalidRequestError unless every token `params.logit_bias` names is in the vocabulary."""
    if params.logit_bias and max(params.logit_bias) >= vocab_size:
        raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab_size})", param="logit_bias")


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.device = resolve_device(config.device)
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this engine runs on {self.device}")
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)  # refused before the load
        self.kv_cache_dtype_name = kv_cache_dtype_name(self.kv_cache_dtype)
        select_backend(config.attention_backend, self.device, self.kv_cache_dtype)  # refused before the load too
        loaded = load_model(resolve_model_path(config.model), self.dtype, self.device, config.max_model_len)
        self.model_path = loaded.path
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.max_model_len = loaded.max_model_len
        self.vocab_size = loaded.model.args.vocab_size

        self.kv_bytes_per_block = kv_bytes_per_block(loaded.model, config.block_size, self.kv_cache_dtype)
        num_blocks = self._num_kv_blocks()
        num_host_blocks = config.swap_space // self.kv_bytes_per_block
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, num_host_blocks)
        self.scheduler = Scheduler(
            config.scheduler_config(self.max_model_len, swaps=num_host_blocks > 0),
            self.kv_cache,
            cost_model=load_cost_model(config.cost_model) if config.cost_model else None,
        )
        self.structured = StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.runner = ModelRunner(loaded.model, num_blocks, config.block_size, self.device, config.attention_backend,
                                  num_host_blocks, self.kv_cache_dtype, self.structured)
        if config.cuda_graphs:
            self.runner.use_static_decode(config.max_num_seqs, self.max_model_len, capture=True,
                                          batch_sizes=config.cuda_graph_sizes)
        self._texts: dict[str, RequestText] = {}
        # Requests that asked for prompt logprobs: those scored so far, until the first token.
        self._prompt_logprobs: dict[str, list[TokenLogprobs | None]] = {}
        self.async_scheduling = (self.device.type == "cuda" if config.async_scheduling is None
                                 else config.async_scheduling)
        self._in_flight: InFlightStep | None = None  # async scheduling: the step launched, not yet read back
        # Whether outputs carry text and stop strings end requests here; the server's front end
        # does both itself and turns this off (issue 10).
        self.detokenize = True
        self.observe_steps = True  # feed each step's time to the scheduler's cost model
        self.last_step_shape = None  # the last step's work, for a caller that times steps itself
        # Which kernels this host got: logged once, and shown by the server's /version.
        self.paths = {"linear": linear_path(self.dtype, self.device),
                      "attention": self.runner.attention_path,
                      "layer_ops": loaded.model.layer_ops_path, "sampling": self.runner.sampler.path}
        logger.info("engine ready: %s, %s on %s, %d KV blocks of %d tokens in %s; linears: %s; attention: %s; "
                    "layer ops: %s; sampling: %s; async scheduling: %s; host: %s", self.model_path, self.dtype,
                    self.device, num_blocks, config.block_size, self.kv_cache_dtype_name, self.paths["linear"],
                    self.paths["attention"], self.paths["layer_ops"], self.paths["sampling"],
                    "on" if self.async_scheduling else "off", host.current().summary())
        # The load left objects that live as long as the engine (370k with SmolLM2, millions
        # with a small model's many KV blocks), and the collector's first full collection, due
        # soon after, would walk them all with the GIL held (0.2-0.5 s) in the first steps.
        # Walking them now, once, puts the next one off until as many again have piled up.
        gc.collect()

    def _num_kv_blocks(self) -> int:
        """The device KV cache's blocks: as given, else as many as its memory holds; ValueError
        if they cannot hold one request of max_model_len."""
        config = self.config
        num_blocks = config.num_kv_blocks or config.kv_cache_memory // self.kv_bytes_per_block
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * config.block_size} tokens, less than one request of "
                f"max_model_len {self.max_model_len}: give it more memory or lower max_model_len"
            )
        return num_blocks

    # -- requests in ------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def apply_chat_template(self, messages: list[dict], **template_kwargs) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **template_kwargs)
        # The template already wrote any special tokens the model expects.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def add_request(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        tenant: str = "",
        cache_salt: str = "",
        deadline: float | None = None,
        slo_ttft_s: float | None = None,
        slo_tpot_s: float | None = None,
    ) -> str:
        """Validate and queue a request; InvalidRequestError, or RequestRejectedError from the
        slo policy, leaves the engine untouched."""
        params = sampling_params or SamplingParams()
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(token_ids)
        check_logit_bias(params, self.vocab_size)
        request = Request(
            request_id=request_id or uuid.uuid4().hex,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            priority=priority,
            tenant=tenant,
            cache_salt=cache_salt,
            deadline=deadline,
            slo_ttft_s=slo_ttft_s,
            slo_tpot_s=slo_tpot_s,
        )
        if params.structured_output is not None:
            # Made into a grammar now (a bad one is refused here), compiled beside the engine: the
            # request waits, held, until it has.
            grammar = self.structured.grammar(params.structured_output)
            request.held = True
        self.scheduler.add_request(request)
        if request.held:
            self.structured.start(request.request_id, grammar)
        if params.prompt_logprobs is not None:
            self._prompt_logprobs[request.request_id] = [None]
        if self.detokenize:
            self._texts[request.request_id] = RequestText.start(self.tokenizer, token_ids, params)
        return request.request_id

    def check_prompt(self, token_ids: list[int]) -> None:
        check_prompt(token_ids, self.vocab_size, self.max_model_len)

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.abort(request_id)
        return self._final_output(request) if request is not None else None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    # -- one step -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        self.last_step_shape = None
        outputs = self._let_go_compiled(0.0)
        if self.async_scheduling:
            outputs += self._step_async()
        else:
            plan, timed_out = self._schedule()
            outputs += timed_out
            if plan.is_empty:
                return outputs + self._wait_for_grammars()
            self.last_step_shape = plan.shape()
            try:
                result = self.runner.execute(plan)
            except Exception as error:  # noqa: BLE001 - a bad step must not take the engine down
                return outputs + self._fail_step(plan, error)
            outputs += self._step_outputs(plan, result, advanced=False)
        # The whole iteration, as a request waiting on it sees it: what TTFT and TPOT are made of
        # (a server's loop, which does more per iteration, times it itself).
        if self.observe_steps and self.last_step_shape is not None:
            self.scheduler.cost_model.observe(self.last_step_shape, time.perf_counter() - started)
        return outputs + self._wait_for_grammars()

    def _step_async(self) -> list[RequestOutput]:
        """Schedule and launch step N+1, then read back step N, which ran on the device
        meanwhile: the host's scheduling and batch building hide behind the device's work.
        Its outputs come a step later than they were launched, so each call returns the
        tokens of the step before the one it queues.

        A request N stops (EOS, a stop token or string, an abort) was already given its
        place in N+1: that token is computed and dropped, and its blocks, freed at N, are
        reused only by steps queued after N+1. Requests whose pending token is their last
        (max_tokens, the context's end) are not scheduled again. Penalties need every
        earlier token on the host, so a step with a penalised request is read back before
        the next is scheduled."""
        outputs: list[RequestOutput] = []
        in_flight, self._in_flight = self._in_flight, None
        # The call's time is mostly the wait for the step it reads back: the cost model is
        # given that step's shape, not the one it launches.
        if in_flight is not None and in_flight.needs_tokens:
            outputs += self._finish_step(in_flight)
            self.last_step_shape, in_flight = in_flight.shape, None
        plan, timed_out = self._schedule()
        outputs += timed_out
        if not plan.is_empty:
            shape = plan.shape()
            try:
                launched = self.runner.launch(plan)
            except Exception as error:  # noqa: BLE001 - a bad step must not take the engine down
                outputs += self._fail_step(plan, error)
            else:
                self.scheduler.advance(plan)
                self._in_flight = InFlightStep(plan, launched, shape)
        if in_flight is not None:
            outputs += self._finish_step(in_flight)
            self.last_step_shape = in_flight.shape
        return outputs

    def _wait_for_grammars(self) -> list[RequestOutput]:
        """With nothing running and a grammar compiling, wait on it a while rather than spin."""
        if self.structured.num_compiling and not self.scheduler.running and self._in_flight is None:
            return self._let_go_compiled(GRAMMAR_WAIT_S)
        return []

    def _let_go_compiled(self, timeout_s: float) -> list[RequestOutput]:
        """Let the scheduler admit the requests whose grammars have compiled (waiting up to
        `timeout_s` for one); those whose grammar failed to compile end here, as errors."""
        outputs = []
        for request_id, error in self.structured.take_compiled(timeout_s):
            request = self.scheduler.requests.get(request_id)
            if request is None:  # ended meanwhile (its grammar is released with it; this is a stray)
                self.structured.release(request_id)
                continue
            request.held = False
            if error is not None:
                self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ERROR)
                output = self._final_output(request)
                output.error = error
                outputs.append(output)
        return outputs

    def _schedule(self) -> tuple[SchedulerOutput, list[RequestOutput]]:
        """The next step's plan, its KV moves done, and the ends of requests that timed out."""
        plan = self.scheduler.schedule()
        for request_id in plan.preempted_ids:
            self.runner.forget(request_id, preempted=True)
        # Before anything else: blocks swapped out this step may be written by it.
        self.runner.swap_blocks(plan.swap_out, plan.swap_in)
        return plan, [self._final_output(request) for request in plan.timed_out]

    def _finish_step(self, step: "InFlightStep") -> list[RequestOutput]:
        try:
            result = self.runner.collect(step.launched)
        except Exception as error:  # noqa: BLE001 - as in step: the step's requests fail, not the engine
            return self._fail_step(step.plan, error)
        return self._step_outputs(step.plan, result, advanced=True)

    def _step_outputs(self, plan: SchedulerOutput, result: StepResult, advanced: bool) -> list[RequestOutput]:
        for request_id, (first_index, entries) in result.prompt_logprobs.items():
            scored = self._prompt_logprobs.get(request_id)
            # Recomputed after a preemption, a request is scored again from its start: keep the first.
            if scored is not None and first_index <= len(scored):
                scored.extend(entries[len(scored) - first_index:])
        updated = self.scheduler.update(plan, result.sampled_token_ids, advanced)
        for request in updated:
            if request.request_id in self.structured and not request.is_finished:
                self._follow_grammar(request)
        return [self._output(request, request.output_token_ids[-1], result.logprobs.get(request.request_id))
                for request in updated]

    def _follow_grammar(self, request: Request) -> None:
        """Give a constrained request's grammar the token it sampled; a complete grammar ends the
        request (even under ignore_eos or min_tokens: nothing more would match)."""
        if not self.structured.accept(request.request_id, request.output_token_ids[-1]):
            # The mask allowed only tokens the grammar takes: this is a bug, not the client's.
            logger.error("request %s sampled a token its grammar refuses", request.request_id)
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_ERROR)
        elif self.structured.is_complete(request.request_id):
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)

    def _fail_step(self, plan: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        logger.exception("model step failed; failing its %d requests", len(plan.scheduled))
        # Blocks registered for this step may hold garbage: forget every cached prefix.
        self.kv_cache.reset_prefix_cache()
        outputs = []
        for scheduled in plan.scheduled:
            request = self.scheduler.finish_request(scheduled.request.request_id, RequestStatus.FINISHED_ERROR)
            if request is not None:
                output = self._final_output(request)
                output.error = f"model step failed: {type(error).__name__}: {error}"
                outputs.append(output)
        return outputs

    # -- outputs ----------------------------------------------------------------------

    def _output(self, request: Request, token_id: int, logprobs: TokenLogprobs | None) -> RequestOutput:
        text = self._texts.get(request.request_id)
        new_text = ""
        if text is not None:
            new_text = text.add(token_id, request.is_finished)
            if text.stopped and not request.is_finished:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
        output = RequestOutput(
            request_id=request.request_id,
            new_token_ids=[token_id],
            new_text=new_text,
            finished=request.is_finished,
            times=request.times(),
            # A stop string found on the token that also reached max_tokens still cut the text.
            finish_reason="stop" if text is not None and text.stopped else request.status.finish_reason,
            new_logprobs=[logprobs] if logprobs is not None else [],
            num_cached_tokens=request.num_cached_tokens,
            prompt_logprobs=self._prompt_logprobs.pop(request.request_id, None),
        )
        if request.is_finished:
            self._forget(request.request_id)
        return output

    def _final_output(self, request: Request) -> RequestOutput:
        """The end of a request that stopped between tokens (abort, timeout, a failed step):
        nothing new, and held-back text is dropped."""
        self._forget(request.request_id)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[],
            new_text="",
            finished=True,
            times=request.times(),
            finish_reason=request.status.finish_reason,
            num_cached_tokens=request.num_cached_tokens,
        )

    def _forget(self, request_id: str) -> None:
        self._texts.pop(request_id, None)
        self._prompt_logprobs.pop(request_id, None)
        self.runner.forget(request_id)
