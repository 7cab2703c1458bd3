"""Per-tenant KV caps (`max_kv_fraction`): while a request of another tenant waits, a tenant
holds no more than its share of the blocks.

"Another tenant waits" means a tenant with room under its own cap has a waiting request: if
every waiting tenant is at its cap, none is held back for the others, which would leave
blocks idle for nobody (two tenants at their caps, each waiting behind the other, would
never move). The scheduler asks `begin_step` once a step, then keeps the counts current
as it allocates and preempts; when a request starts waiting in mid-step (preempted for lack
of blocks), the other capped tenants stop growing from then on.
"""

from collections import Counter
from typing import Callable, Iterable

from scheduler.request import Request


class TenantKVCaps:
    def __init__(self, fractions: dict[str, float], num_blocks: int, block_size: int,
                 blocks_of: Callable[[str], list[int]]):
        self.caps = {tenant: int(fraction * num_blocks) for tenant, fraction in fractions.items()}
        self.block_size = block_size
        self._blocks_of = blocks_of  # a request id's device blocks
        self.held: Counter[str] = Counter()  # blocks of running requests, per tenant
        self.binding: set[str] = set()  # capped tenants that another tenant waits behind, this step
        self._full: set[str] = set()  # of those, the ones found with no room for a request this step
        self.num_lifted = 0  # steps in which the caps were lifted so that something could run

    def __bool__(self) -> bool:
        return bool(self.caps)

    def begin_step(self, running: Iterable[Request], waiting: Iterable[Request]) -> None:
        self.held = Counter()
        for request in running:
            self.held[request.tenant] += len(self._blocks_of(request.request_id))
        # A tenant at its cap cannot take even a block more: it does not hold others back.
        under = {request.tenant for request in waiting if not self.over(request.tenant, 1)}
        self.binding = {tenant for tenant in self.caps if under - {tenant}}
        self._full = set()

    def over(self, tenant: str, num_new_blocks: int = 0) -> bool:
        """Whether the tenant would hold more than its cap with `num_new_blocks` more."""
        cap = self.caps.get(tenant)
        return cap is not None and self.held[tenant] + num_new_blocks > cap

    def holds_back(self, request: Request, num_new_tokens: int, num_computed_tokens: int | None = None) -> bool:
        """Whether giving `request` these tokens (from `num_computed_tokens` on: a new request's
        cached prefix) would take its tenant past a binding cap."""
        if request.tenant not in self.binding:
            return False
        start = request.num_computed_tokens if num_computed_tokens is None else num_computed_tokens
        needed = -(-(start + num_new_tokens) // self.block_size)
        return self.over(request.tenant, needed - len(self._blocks_of(request.request_id)))

    def has_no_room(self, tenant: str) -> bool:
        return tenant in self._full or (tenant in self.binding and self.over(tenant, 1))

    def lift(self) -> None:
        """No cap binds for the rest of this step (the scheduler found nothing else to run)."""
        self.binding = set()
        self.num_lifted += 1

    def mark_full(self, tenant: str) -> None:
        self._full.add(tenant)

    def gained(self, tenant: str, num_blocks: int) -> None:
        self.held[tenant] += num_blocks

    def released(self, request: Request) -> None:
        """A running request of `tenant` gives its blocks up (call before they are freed)."""
        self.held[request.tenant] -= len(self._blocks_of(request.request_id))
        if not self.over(request.tenant):  # it now waits, under its cap: the others must not grow
            self.binding |= set(self.caps) - {request.tenant}
