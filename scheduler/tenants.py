"""Tenants: who shares the engine, and on what terms (`--tenants FILE`, TOML).

    [tenants.chat]
    weight = 2            # fair share: twice the service of a weight-1 tenant
    priority = 0          # the priority of its requests that give none (lower runs first)
    api_keys = ["sk-chat-1"]
    slo_ttft_ms = 2000    # slo policy: its requests' targets, unless a request gives its own
    slo_tpot_ms = 200

    [tenants.batch]
    weight = 1
    priority = 1
    max_queued = 100      # its sequences waiting for a seat; more get 429
    max_kv_fraction = 0.5 # no more than half the KV blocks while another tenant's requests wait
    tokens_per_minute = 600000  # prompt tokens plus max_tokens admitted per minute; more get 429

A request's tenant is its API key's tenant, else its `user` field when that names a
tenant, else `default`: a client cannot mint tenants (nor metric label values) by
sending new names. `default` exists whether the file names it or not.
"""

from dataclasses import dataclass, fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the CUDA base images): the same parser, as a package
    import tomli as tomllib

DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    weight: float = 1.0
    priority: int = 0
    api_keys: tuple[str, ...] = ()
    max_queued: int | None = None  # sequences of this tenant that may wait for a seat; more get 429
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    max_kv_fraction: float | None = None
    tokens_per_minute: int | None = None


class TenantsError(ValueError):
    """A tenants file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class Tenants:
    by_name: dict[str, Tenant]

    @classmethod
    def default_only(cls) -> "Tenants":
        return cls({DEFAULT_TENANT: Tenant(DEFAULT_TENANT)})

    @property
    def is_configured(self) -> bool:
        return set(self.by_name) != {DEFAULT_TENANT} or self.by_name[DEFAULT_TENANT] != Tenant(DEFAULT_TENANT)

    @property
    def weights(self) -> dict[str, float]:
        return {name: tenant.weight for name, tenant in self.by_name.items()}

    @property
    def kv_fractions(self) -> dict[str, float]:
        return {name: tenant.max_kv_fraction for name, tenant in self.by_name.items()
                if tenant.max_kv_fraction is not None}

    def by_api_key(self) -> dict[str, str]:
        return {key: tenant.name for tenant in self.by_name.values() for key in tenant.api_keys}

    def resolve(self, key_tenant: str | None, user: str | None) -> Tenant:
        if key_tenant is not None:
            return self.by_name[key_tenant]
        return self.by_name.get(user or DEFAULT_TENANT, self.by_name[DEFAULT_TENANT])


def load_tenants(path: str | Path) -> Tenants:
    try:
        document = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise TenantsError(f"{path}: {error}") from None
    unknown = set(document) - {"tenants"}
    if unknown:
        raise TenantsError(f"{path}: unknown top-level keys {sorted(unknown)}; put each tenant under [tenants.NAME]")
    by_name = {DEFAULT_TENANT: Tenant(DEFAULT_TENANT)}
    allowed = {f.name for f in fields(Tenant)} - {"name"}
    seen_keys: dict[str, str] = {}
    for name, table in document.get("tenants", {}).items():
        where = f"{path}: [tenants.{name}]"
        if not isinstance(table, dict):
            raise TenantsError(f"{where} must be a table")
        extra = set(table) - allowed
        if extra:
            raise TenantsError(f"{where}: unknown keys {sorted(extra)}; known: {sorted(allowed)}")
        weight, priority, max_queued = table.get("weight", 1.0), table.get("priority", 0), table.get("max_queued")
        keys = table.get("api_keys", [])
        if not _is_number(weight) or weight <= 0:
            raise TenantsError(f"{where}: weight must be a positive number, got {weight!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TenantsError(f"{where}: priority must be an integer, got {priority!r}")
        if max_queued is not None and (isinstance(max_queued, bool) or not isinstance(max_queued, int)
                                       or max_queued < 0):
            raise TenantsError(f"{where}: max_queued must be a non-negative integer, got {max_queued!r}")
        for name_ in ("slo_ttft_ms", "slo_tpot_ms"):
            value = table.get(name_)
            if value is not None and (not _is_number(value) or value <= 0):
                raise TenantsError(f"{where}: {name_} must be a positive number of milliseconds, got {value!r}")
        fraction = table.get("max_kv_fraction")
        if fraction is not None and (not _is_number(fraction) or not 0 < fraction <= 1):
            raise TenantsError(f"{where}: max_kv_fraction must be in (0, 1], got {fraction!r}")
        rate = table.get("tokens_per_minute")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate < 1):
            raise TenantsError(f"{where}: tokens_per_minute must be a positive integer, got {rate!r}")
        if not isinstance(keys, list) or not all(isinstance(key, str) and key for key in keys):
            raise TenantsError(f"{where}: api_keys must be a list of non-empty strings")
        for key in keys:
            if key in seen_keys:
                raise TenantsError(f"{where}: an API key is listed for {seen_keys[key]!r} too")
            seen_keys[key] = name
        by_name[name] = Tenant(name, float(weight), priority, tuple(keys), max_queued, table.get("slo_ttft_ms"),
                               table.get("slo_tpot_ms"), fraction, rate)
    return Tenants(by_name)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
