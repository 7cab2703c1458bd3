"""Iteration-level scheduling: every step decides who runs and with how many tokens.

One rule covers prefill, chunked prefill, prefix-cache hits, recompute and decode
(as in vLLM v1): a request's `num_computed_tokens` catches up with its token count,
and each step hands out a token budget to make that happen.
"""

import time
from typing import Callable

from kvcache import KVCacheManager
from scheduler import preemption, slo
from scheduler.batching import make_batching_policy
from scheduler.config import SchedulerConfig
from scheduler.cost_model import StepCostModel
from scheduler.kv_caps import TenantKVCaps
from scheduler.output import ScheduledRequest, SchedulerOutput
from scheduler.policy import make_waiting_queue
from scheduler.prefill_gate import PrefillGate
from scheduler.request import Request, RequestStatus


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache: KVCacheManager,
        clock: Callable[[], float] = time.monotonic,
        cost_model: StepCostModel | None = None,
    ):
        self.config = config
        self.kv_cache = kv_cache
        self.clock = clock
        # The engine feeds it each step's measured time (`observe`); the slo policy plans with it.
        self.cost_model = cost_model or StepCostModel()
        self.waiting = make_waiting_queue(config.policy, config.priority_aging_s, config.tenant_weights,
                                          self._output_token_cost)
        self.token_budget = config.max_num_batched_tokens  # this step's, after the slo policy's adjustments
        self.recent_ttft_targets = slo.RecentMinimum(slo.TTFT_TARGET_MEMORY_S)  # the slo policy's
        self.kv_caps = TenantKVCaps(config.tenant_kv_fractions, kv_cache.pool.num_blocks, kv_cache.block_size,
                                    kv_cache.block_ids)
        self.prefill_gate = PrefillGate(self.waiting.rank, enabled=config.policy == "priority")
        self.running: list[Request] = []  # in rank, then admission order: the last is preempted first
        self.requests: dict[str, Request] = {}
        self.num_preemptions_by_mode = {"recompute": 0, "swap": 0}
        self.num_blocks_swapped = {"out": 0, "in": 0}
        self._num_with_deadline = 0  # unfinished requests with a deadline: none, and no check is needed
        self.batching = make_batching_policy(config)

    # -- intake -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request; RequestRejectedError (before any state changes) if the slo policy
        finds its TTFT target out of reach and is configured to refuse such requests."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if self.config.policy == "slo" and request.slo_ttft_s is not None:
            self.recent_ttft_targets.add(self.clock(), request.slo_ttft_s)  # refused or not: it was asked for
            slo.check_ttft_reachable(self, request)
        self.requests[request.request_id] = request
        self._num_with_deadline += request.deadline is not None
        self.waiting.add(request)
        self.batching.add(request, self.clock())

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_preemptions(self) -> int:
        return sum(self.num_preemptions_by_mode.values())

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def reads_cost_model(self) -> bool:
        """Whether the policy plans with the cost model (slo) or ranks by it (sjf); the others
        never read it, so a simulator need not feed it."""
        return self.config.policy in ("slo", "sjf")

    def _output_token_cost(self) -> float:
        """What one output token costs in prompt tokens, by the cost model (for sjf)."""
        c = self.cost_model.coefficients
        return c.decode_seq_s / c.prefill_token_s if c.prefill_token_s > 0 else 1.0

    def estimate_ttft(self, request: Request) -> float:
        """slo policy: seconds from now to `request`'s first token if it were queued now."""
        return slo.estimate_ttft(self, request)

    def cached_prefix(self, request: Request) -> tuple[list, int]:
        """The cached blocks admitting `request` would reuse, and the tokens they cover."""
        return self.kv_cache.get_computed_blocks(request) if request.reads_prefix_cache else ([], 0)

    # -- admission ------------------------------------------------------------------------

    def next_admissible(self) -> Request | None:
        """The waiting request to offer a seat: the policy's next that the batching mode lets
        in (under static or dynamic batching, a member of the launched batch: a request that
        came later may outrank them), not held by the engine and, with KV caps, whose tenant has room."""
        request = self.waiting.peek()
        if self._may_admit(request):
            return request
        return next((r for r in self.waiting if self._may_admit(r)), None)

    def _may_admit(self, request: Request) -> bool:
        if request.held:
            return False
        if self.kv_caps.binding and self.kv_caps.has_no_room(request.tenant):
            return False
        return self.batching.may_admit(request)

    @property
    def padding_tokens(self) -> int:
        """Tokens a padded static or dynamic batch would have computed for nothing; 0 when continuous."""
        return self.batching.padding_tokens

    def seconds_until_launch(self) -> float:
        """How long schedule() will plan nothing because a static or dynamic batch is filling up.

        0 when a step can run now (or nothing waits); an engine loop may sleep this long
        unless a new request comes, instead of spinning on empty plans.
        """
        return self.batching.seconds_until_launch(self.waiting, self.clock())

    # -- one step -----------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput(timed_out=self._end_timed_out())
        self.prefill_gate.begin_step()
        # The budget goes to running requests in rank order (stable: admission order among
        # equals, so FCFS is untouched): an urgent prompt's chunks come before a batch job's.
        self.running.sort(key=self.waiting.rank)
        if self.kv_caps:
            self.kv_caps.begin_step(self.running, self.waiting)
            preemption.enforce_kv_caps(self, output)
        if self.waiting.preempts:
            preemption.make_room_for_waiting(self, output)
        slo_policy = self.config.policy == "slo"
        budget = self.token_budget = slo.plan_token_budget(self) if slo_policy else self.config.max_num_batched_tokens
        # Under slo the decodes' one token each is set aside first: a prompt ranked ahead of
        # them must not take a step's whole (TPOT-sized) budget.
        reserved = 0
        if slo_policy:
            self.running.sort(key=lambda r: not slo.is_decoding(r))
            reserved = min(budget - 1, sum(map(slo.is_decoding, self.running)))
        num_preempted_before = len(output.preempted_ids)
        # Waiting requests that outrank the worst running one are admitted first, to the front,
        # so the budget reaches them before the requests they outrank.
        if self.running and self.waiting:
            worst = self.waiting.rank(preemption.worst_running(self))
            if self.waiting.rank(self.waiting.peek()) < worst:
                budget = reserved + self._admit_waiting(budget - reserved, output, outranking=worst)

        budget = self._schedule_running(len(output.scheduled), budget, output)  # those admitted first are in
        # Admitting while the running ones ran out of blocks would just swap one victim for another.
        if len(output.preempted_ids) == num_preempted_before:
            budget = self._admit_waiting(budget, output)
        if not output.scheduled and self.running and self.kv_caps.binding:
            # Caps held every running request back and no waiting one could start (say, it
            # needs more blocks than are free): a step with nothing in it would come again
            # forever, so this step the caps do not bind.
            self.kv_caps.lift()
            budget = self._schedule_running(0, budget, output)
        if output.scheduled:
            self.batching.count_padding()
        return output

    def _schedule_running(self, index: int, budget: int, output: SchedulerOutput) -> int:
        """Tokens for running[index:] in order while the budget lasts; returns what is left."""
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._num_tokens_to_schedule(request, budget)
            if num_new == 0 or self.kv_caps.holds_back(request, num_new) or self.prefill_gate.holds_back(request):
                index += 1
                continue
            if not preemption.allocate_or_preempt(self, index, num_new, output):
                continue  # the request itself gave way: running[index] is now the next one
            output.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            index += 1
        return budget

    def _end_timed_out(self) -> list[Request]:
        """Requests past their deadline, or waiting unscheduled past the queue timeout, end here
        and free their blocks, before anyone is given tokens."""
        now = self.clock()
        queue_timeout = self.config.queue_timeout_s
        if queue_timeout is None and not self._num_with_deadline:
            return []
        timed_out = [
            request for request in self.requests.values()
            if (request.deadline is not None and now >= request.deadline)
            or (queue_timeout is not None and request.first_scheduled_time is None
                and now - request.arrival_time >= queue_timeout)]
        for request in timed_out:
            self._finish(request, RequestStatus.FINISHED_TIMEOUT)
        return timed_out

    def _num_tokens_to_schedule(self, request: Request, budget: int, num_computed: int | None = None) -> int:
        """Tokens to give `request` this step (0: it must wait), from `num_computed` on."""
        if request.num_pending_tokens and self._ends_with_pending(request):
            return 0  # the token in flight is its last: another step would be thrown away
        num_new = (request.num_tokens + request.num_pending_tokens
                   - (request.num_computed_tokens if num_computed is None else num_computed))
        if not self.config.enable_chunked_prefill:
            return num_new if num_new <= budget else 0
        threshold = self.config.long_prefill_token_threshold
        if threshold:
            num_new = min(num_new, threshold)
        return min(num_new, budget)

    def _admit_waiting(self, budget: int, output: SchedulerOutput, outranking: tuple | None = None) -> int:
        """Admit waiting requests in the policy's order while seats, budget and blocks last; with
        `outranking`, only those ranked above it, each placed before the running requests."""
        self.batching.launch(self.waiting, self.clock())
        num_admitted = 0
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.next_admissible()
            if request is None:
                break
            if request.status is RequestStatus.PREEMPTED and request.request_id in output.preempted_ids:
                break  # it gave its seat up this very step, to someone who could not take it after all
            if outranking is not None and not self.waiting.rank(request) < outranking:
                break
            if self.prefill_gate.holds_back(request):
                break  # the rest rank lower still
            if self.kv_cache.is_swapped(request.request_id):
                num_new = self._num_tokens_to_schedule(request, budget)
                if self.kv_caps.holds_back(request, num_new):
                    self.kv_caps.mark_full(request.tenant)
                    continue
                if num_new == 0 or not preemption.swap_in(self, request, num_new, output):
                    break
                self.waiting.remove(request)
            else:
                computed_blocks, num_cached = self.cached_prefix(request)
                num_new = self._num_tokens_to_schedule(request, budget, num_cached)
                if num_new == 0:
                    break
                if self.kv_caps.holds_back(request, num_new, num_cached):
                    self.kv_caps.mark_full(request.tenant)
                    continue
                if self.kv_cache.allocate_slots(request, num_new, computed_blocks) is None:
                    break
                self.waiting.remove(request)
                if request.status is RequestStatus.WAITING:
                    request.num_cached_tokens = num_cached
                request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            if self.kv_caps:
                self.kv_caps.gained(request.tenant, len(self.kv_cache.block_ids(request.request_id)))
            if request.first_scheduled_time is None:
                request.first_scheduled_time = self.clock()
            if outranking is None:
                self.running.append(request)
            else:
                self.running.insert(num_admitted, request)
                num_admitted += 1
            output.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        return budget

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        return ScheduledRequest(request, num_new, self.kv_cache.block_ids(request.request_id))

    def _ends_with_pending(self, request: Request) -> bool:
        """Whether the tokens in flight bring `request` to its max_tokens or the context's end."""
        num_tokens = request.num_tokens + request.num_pending_tokens
        return (len(request.output_token_ids) + request.num_pending_tokens >= request.sampling_params.max_tokens
                or num_tokens >= self.config.max_model_len)

    # -- after the model ran ------------------------------------------------------------

    def advance(self, output: SchedulerOutput) -> None:
        """Async scheduling: move the scheduled requests on as if the step had run, before its
        tokens are known, so the next step can be scheduled while this one runs. A request
        that samples holds a pending token until `update(output, ..., advanced=True)`; the
        next step computes that token from the device (the engine fills it in)."""
        for scheduled in output.scheduled:
            self._advance(scheduled)

    def _advance(self, scheduled: ScheduledRequest) -> None:
        request = scheduled.request
        start = request.num_computed_tokens
        request.num_computed_tokens += scheduled.num_new_tokens
        num_prompt_computed = max(0, min(request.num_computed_tokens, request.num_prompt_tokens) - start)
        self.waiting.charge(request, num_prompt_computed, 1 if scheduled.samples else 0)
        request.num_pending_tokens += scheduled.samples

    def update(self, output: SchedulerOutput, sampled_token_ids: dict[str, int],
               advanced: bool = False) -> list[Request]:
        """Apply one step's results (`advanced`: `advance` already moved it on); returns the
        requests that got a token, in step order.

        Under async scheduling a request may have stopped, or been aborted, at the step
        before this one, which had already scheduled it here: its token here is dropped."""
        now = self.clock()
        updated = []
        for scheduled in output.scheduled:
            request = scheduled.request
            if request.is_finished:  # aborted while the step ran, or stopped at the one before
                continue
            if not advanced:
                self._advance(scheduled)
            if not scheduled.samples:
                continue
            request.num_pending_tokens -= 1
            token_id = sampled_token_ids[request.request_id]
            request.append_output_token(token_id)
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
            status = self._stop_status(request, token_id)
            if status is not None:
                self._finish(request, status)
            updated.append(request)
        return updated

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        num_output = len(request.output_token_ids)
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if num_output >= params.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # -- endings from outside -------------------------------------------------------------

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request in any state (abort, error, a stop string found by the engine)."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, status)
        return request

    def abort(self, request_id: str) -> Request | None:
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        request.finished_time = self.clock()
        self.kv_cache.free(request)
        self.batching.forget(request)
        self.waiting.finished(request)
        self._num_with_deadline -= request.deadline is not None
        del self.requests[request.request_id]
