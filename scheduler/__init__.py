"""The request state machine and the per-step plan.

Owns request state (waiting, running, preempted, finished), the scheduling policy
(fcfs, priority, sjf, fair, slo: scheduler/policy.py, scheduler/fair.py), the step cost
model the slo policy plans with (scheduler/cost_model.py), tenants and their terms
(scheduler/tenants.py), deadlines, the batching mode (continuous, or static / dynamic batches run to
completion, with their padding counted), and `Scheduler.schedule()`, which decides each step who runs with how
many tokens within the token budget, seat limit and free KV blocks, preempting
(scheduler/preemption.py: recompute or swap) when blocks run out. Block
accounting is delegated to `kvcache/`. Pure Python: must not import torch or
fastapi, so it is deterministic under a virtual clock and a fake model runner.
"""

from scheduler.config import SchedulerConfig
from scheduler.cost_model import StepCostModel, StepShape
from scheduler.request import InvalidRequestError, Request, RequestRejectedError, RequestStatus, SamplingParams, \
    StructuredOutput
from scheduler.output import ScheduledRequest, SchedulerOutput
from scheduler.scheduler import Scheduler

__all__ = [
    "InvalidRequestError",
    "Request",
    "RequestRejectedError",
    "RequestStatus",
    "SamplingParams",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "StepCostModel",
    "StepShape",
    "StructuredOutput",
]
