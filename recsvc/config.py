"""The one typed home of recsvc's configuration.

Every setting has a documented default; a TOML file overrides any subset of
them. Unknown keys and bad values are errors that name the key, e.g.::

    recsvc.toml: retrieval.shares.ann: Input should be greater than or equal to 0

The README's configuration reference is generated from the field descriptions
below (``recsvc config --defaults`` prints the defaults as TOML).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", description="Address to listen on ('0.0.0.0' for all interfaces).")
    port: int = Field(50051, ge=0, le=65535, description="TCP port; 0 picks a free ephemeral port.")
    max_workers: int = Field(8, ge=1, le=256, description="gRPC worker threads (requests run in parallel).")
    grace_period_s: float = Field(5.0, ge=0, description="On shutdown, in-flight calls get this long to finish.")
    max_batch: int = Field(10_000, ge=1, description="Most events or items accepted in one Feedback/Upsert call.")
    shed_overload: bool = Field(
        True,
        description="Refuse what cannot be served in time with RESOURCE_EXHAUSTED (retryable) instead of "
        "queueing it (max_queued_rpcs, min_deadline_ms); false: calls wait for a worker without bound.",
    )
    max_queued_rpcs: int = Field(
        8, ge=0,
        description="Calls that may wait for a worker beyond the max_workers running (health checks count too); "
        "more are refused at once with RESOURCE_EXHAUSTED.",
    )
    min_deadline_ms: float = Field(
        5.0, ge=0, allow_inf_nan=False,
        description="A call whose deadline leaves less than this when a worker takes it up is refused with "
        "RESOURCE_EXHAUSTED instead of started (0: never).",
    )


class DemoCatalogConfig(_Section):
    n_items: int = Field(100_000, ge=10, description="Items in the synthetic demo catalog.")
    dim: int = Field(64, ge=2, le=4096, description="Embedding dimension of the demo catalog.")
    n_categories: int = Field(24, ge=1, le=1000, description="Categories in the demo catalog.")
    n_topics: int = Field(12, ge=1, description="Latent topics shared across categories.")
    seed: int = Field(20261129, description="Seed: the same settings always give the same catalog.")


class CatalogConfig(_Section):
    path: Path | None = Field(
        None, description="Catalog directory (embeddings.npy + items.jsonl). None: the demo catalog."
    )
    cache_dir: Path = Field(
        Path("~/.cache/recsvc"), description="Where the demo catalog and its index are cached."
    )
    demo: DemoCatalogConfig = DemoCatalogConfig()


class IndexConfig(_Section):
    space: Literal["ip", "cosine"] = Field(
        "cosine", description="Similarity of the HNSW index: inner product or cosine."
    )
    m: int = Field(16, ge=4, le=128, description="HNSW graph degree (M).")
    ef_construction: int = Field(200, ge=10, description="HNSW build-time beam width.")
    ef_search_factor: float = Field(
        1.0, ge=1.0, description="ef at query time = max(ef_search_min, factor * k) for the usual ANN fetch size k."
    )
    ef_search_min: int = Field(64, ge=1, description="Lower bound of ef at query time.")
    build_threads: int = Field(0, ge=0, description="Threads for index builds; 0 = all cores.")
    grow_factor: float = Field(1.5, gt=1.0, description="Capacity multiplier when the live index is full.")
    huge_pages: bool = Field(
        True, description="Back the index with transparent huge pages (Linux; best effort): fewer TLB misses per query."
    )
    reorder: bool = Field(
        True,
        description="On load, renumber a saved index's nodes in embedding-cluster order, once per file "
        "(the same graph, better cache locality).",
    )


class RetrievalConfig(_Section):
    n_candidates: int = Field(1000, ge=1, le=100_000, description="Candidates handed to ranking.")
    shares: dict[Literal["ann", "cooccurrence", "popular", "fresh"], Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: {"ann": 600, "cooccurrence": 200, "popular": 100, "fresh": 100},
        description="Per-source candidate quotas; unused share flows to the other sources.",
    )
    overfetch: float = Field(
        1.1, ge=1.0,
        description="ANN margin: it fetches share * overfetch / (the filters' estimated pass rate) + excluded items.",
    )
    fresh_window_days: float = Field(30.0, gt=0, description="Items younger than this are 'fresh'.")
    popularity_half_life_days: float = Field(
        7.0, gt=0, description="Half-life of the exponentially decayed popularity counts."
    )
    cooccurrence_window: int = Field(
        20, ge=1, description="A user's last N interactions co-occur with each new one."
    )
    cooccurrence_neighbors: int = Field(50, ge=1, description="Top neighbours kept per item.")
    history_size: int = Field(200, ge=1, description="Recent interactions kept per user.")
    exclude_consumed: bool = Field(
        True, description="Never recommend items already in the user's history."
    )
    history_half_life: float = Field(
        10.0, gt=0, description="Recency weight half-life (in interactions) for the derived user embedding."
    )


class RankingConfig(_Section):
    model_path: Path | None = Field(
        None, description="Ranker weights file (JSON). None: the default weights shipped with recsvc."
    )
    freshness_half_life_days: float = Field(
        14.0, gt=0, description="Age decay used by the freshness feature."
    )


class ExplorationConfig(_Section):
    policy: Literal["greedy", "thompson", "ucb1", "epsilon_greedy"] = Field(
        "thompson", description="Exploration policy (per experiment variant overridable)."
    )
    epsilon: float = Field(0.05, ge=0.0, le=1.0, description="Exploration rate of epsilon_greedy.")
    ucb_c: float = Field(1.0, ge=0.0, description="Exploration constant of ucb1.")
    top_m: int = Field(50, ge=1, description="Thompson/UCB/epsilon explore among the ranker's top M.")
    propensity_draws: int = Field(
        128, ge=1, description="Monte-Carlo rounds per request for Thompson propensities (cost ~ M x rounds Beta draws)."
    )
    prior_strength: float = Field(
        100.0, gt=0,
        description="Thompson/UCB prior: Beta with the ranker's click probability as mean and this many pseudo-observations.",
    )
    prior_alpha: float = Field(1.0, gt=0, description="Item-level Beta prior alpha (the bandit_mean feature).")
    prior_beta: float = Field(20.0, gt=0, description="Item-level Beta prior beta (a prior CTR of ~5%).")
    discount: float = Field(
        1.0, gt=0.0, le=1.0, description="Multiplies old bandit evidence per update (1 = no decay)."
    )
    min_propensity: float = Field(
        1e-4, gt=0, le=1, description="Floor on reported propensities (keeps IPS weights finite)."
    )
    seed: int | None = Field(None, description="Seed of the per-worker generators (None: entropy).")
    random_share: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Share of requests (by a hash of the request id) served uniformly at random from the eligible "
                    "candidates, filters and pinned/sponsored slots kept, with exact propensities (0: none).",
    )


class RerankingConfig(_Section):
    max_per_category: int = Field(3, ge=0, description="Most items of one category in a slate; 0 = no quota.")
    mmr_lambda: float = Field(
        0.0, ge=0.0, le=1.0, description="MMR diversity weight: 0 off, 1 pure diversity."
    )
    freshness_boost: float = Field(
        0.0, ge=0.0, allow_inf_nan=False, description="Added score * freshness (0..1); finite."
    )
    long_tail_boost: float = Field(
        0.0, ge=0.0, allow_inf_nan=False, description="Added score * (1 - popularity percentile); finite."
    )
    max_maturity: int = Field(
        18, ge=0, description="Service-wide ceiling: items rated above this are never served."
    )
    pinned: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict,
        description="item_id -> fixed 0-based position (below recommend.max_n), when eligible.",
    )
    sponsored_items: list[str] = Field(default_factory=list, description="Sponsored item ids.")
    sponsored_positions: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="0-based positions (below recommend.max_n) reserved for sponsored items."
    )

    def position_errors(self, max_n: int) -> list[tuple[str, str]]:
        """(key, message) for every pinned or sponsored position no slate can have (``>= max_n``)."""
        errors = [(f"pinned.{item}", f"position {pos} is beyond the largest slate (recommend.max_n = {max_n})")
                  for item, pos in self.pinned.items() if pos >= max_n]
        errors += [(f"sponsored_positions.{i}",
                    f"position {pos} is beyond the largest slate (recommend.max_n = {max_n})")
                   for i, pos in enumerate(self.sponsored_positions) if pos >= max_n]
        return errors


class BudgetConfig(_Section):
    total_ms: float = Field(200.0, gt=0, description="Budget of one Recommend call.")
    candidates_ms: float = Field(50.0, gt=0, description="Budget of candidate generation.")
    ranking_ms: float = Field(100.0, gt=0, description="Budget of ranking.")
    reranking_ms: float = Field(20.0, gt=0, description="Budget of re-ranking.")


class RecommendConfig(_Section):
    default_n: int = Field(10, ge=1, description="Slate size when a request says n = 0.")
    max_n: int = Field(500, ge=1, description="Largest slate a request may ask for.")


class StateConfig(_Section):
    backend: Literal["embedded", "redis"] = Field(
        "embedded",
        description="'embedded': a local log and snapshots under `dir` (one process). 'redis': a Redis stream "
        "shared by every worker and replica, each applying it to its own read model.",
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis server of the 'redis' backend.")
    redis_prefix: str = Field(
        "recsvc", description="Prefix of every Redis key of this service (several services may share a Redis)."
    )
    max_staleness_ms: float = Field(
        1000.0, gt=0,
        description="'redis' backend: Recommend marks responses degraded once the read model has not heard "
        "from Redis for this long.",
    )
    dedupe_ttl_s: float | None = Field(
        None, gt=0,
        description="'redis' backend: how long an event id is remembered for idempotency (None: max_event_age_days "
        "+ 1 h, so every event that could be accepted is de-duplicated).",
    )
    dir: Path = Field(Path(".recsvc/state"), description="Where the event log and snapshots live.")
    fsync: Literal["batch", "none"] = Field(
        "batch", description="'batch': fsync the log before every Feedback ack; 'none': leave it to the OS."
    )
    snapshot_every_events: int = Field(
        100_000, ge=1, description="Snapshot after this many new events (and on shutdown)."
    )
    dedupe_window: int = Field(
        1_000_000, ge=1, description="Event ids remembered for idempotency (most recent)."
    )
    served_log_size: int = Field(
        200_000, ge=1,
        description="Served slates kept for attribution, experiments and training (most recent), in compact "
        "columns: ~0.44 KB of resident memory each with 10 items and ~0.68 KB with 20 (19 logged features): "
        "~85-130 MiB at the default (benchmarks/bench_served_log.py).",
    )
    attribution_window_s: float = Field(
        1800.0, gt=0, description="An impression with no click within this window counts as a failure."
    )
    max_event_age_days: float = Field(
        30.0, gt=0, description="Events older than this (or more than 1 h in the future) are rejected."
    )


class ExperimentsConfig(_Section):
    file: Path | None = Field(None, description="Experiment definitions (TOML). None: no experiments.")
    cuped_pre_days: int = Field(
        14, ge=0, le=90,
        description="CUPED pre-period: each user's impressions, clicks, conversions and value over the whole UTC "
                    "days before the day of their first exposure to an experiment arm, this many days back, adjust "
                    "the report's effects (variance reduction). Every user's daily activity is kept this long "
                    "(about 200 bytes per active user-day, in the aggregates snapshot). 0 = off. Restart to change.",
    )


def _check_secret_source(value: str | None, key: str) -> None:
    if value and not (value.startswith("file:") or value.startswith("env:")):
        raise ValueError(f"{key} must be 'file:PATH' or 'env:VARIABLE' (a token never sits in a config file "
                         "or on the command line)")


class MetricsConfig(_Section):
    port: int = Field(
        9464, ge=0, le=65535,
        description="Prometheus endpoint (/metrics) of `recsvc serve`; 0 = off. With --workers the supervisor "
        "serves it for all workers (prometheus_client multiprocess mode).",
    )
    host: str = Field("", description="Address of the metrics endpoint; empty: server.host.")
    sample_interval_s: float = Field(
        5.0, gt=0, description="How often sizes, lag and experiment totals are read into gauges."
    )


class LoggingConfig(_Section):
    format: Literal["text", "json"] = Field(
        "text", description="'text' for people at a terminal; 'json': one JSON object per line (with request ids)."
    )
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Least severe level logged.")
    requests: bool = Field(
        False, description="Log one line per RPC (method, status, latency, request id); off by default."
    )


class TlsConfig(_Section):
    cert: Path | None = Field(None, description="Server certificate chain (PEM). With key: serve TLS only.")
    key: Path | None = Field(None, description="Private key of the server certificate (PEM).")
    client_ca: Path | None = Field(
        None, description="CA bundle (PEM) of client certificates: set, every caller must present one (mutual TLS)."
    )

    @model_validator(mode="after")
    def _pair(self) -> "TlsConfig":
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls.cert and tls.key go together: set both or neither")
        if self.client_ca is not None and self.cert is None:
            raise ValueError("tls.client_ca (mutual TLS) needs tls.cert and tls.key")
        return self


class AuthConfig(_Section):
    read_tokens: list[str] = Field(
        default_factory=list,
        description="Where the tokens of the read scope (Recommend, GetExperimentReport) are: 'file:PATH' "
        "(one token per line) or 'env:VARIABLE'. Empty read and write lists: no authentication.",
    )
    write_tokens: list[str] = Field(
        default_factory=list,
        description="Tokens of the write scope (Feedback, UpsertItems, DeleteItems, ReloadRanker; they may "
        "read too), as 'file:PATH' or 'env:VARIABLE'.",
    )

    @model_validator(mode="after")
    def _sources(self) -> "AuthConfig":
        for name in ("read_tokens", "write_tokens"):
            for i, v in enumerate(getattr(self, name)):
                _check_secret_source(v, f"{name}.{i}")
        return self


class ClientConfig(_Section):
    target: str = Field(
        "", description="host[:port] the client verbs (recommend, feedback, ...) call (no port: 50051); empty: this "
        "config's server.host:server.port (0.0.0.0 as 127.0.0.1), so a server's config file serves its clients too."
    )
    token: str = Field(
        "env:RECSVC_TOKEN", description="Bearer token of the client verbs: 'file:PATH' or 'env:VARIABLE' "
        "(unset or empty: none)."
    )
    tls: bool = Field(False, description="Call over TLS (implied by tls_ca).")
    tls_ca: Path | None = Field(None, description="CA (PEM) that signed the server's certificate; None: system roots.")
    tls_cert: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    tls_key: Path | None = Field(None, description="Private key of the client certificate (PEM).")
    server_name: str = Field(
        "", description="Name the server's certificate is checked against, when it differs from the target host."
    )

    @model_validator(mode="after")
    def _token_source(self) -> "ClientConfig":
        _check_secret_source(self.token, "token")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("client.tls_cert and client.tls_key go together: set both or neither")
        return self


class Config(_Section):
    """The whole configuration; ``Config()`` is the documented default."""

    def client_target(self) -> str:
        """Where the client verbs call: ``client.target``, else this config's server address."""
        if self.client.target:
            return self.client.target
        host = self.server.host if self.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"[{host}]:{self.server.port}" if ":" in host else f"{host}:{self.server.port}"

    server: ServerConfig = ServerConfig()
    catalog: CatalogConfig = CatalogConfig()
    index: IndexConfig = IndexConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    ranking: RankingConfig = RankingConfig()
    exploration: ExplorationConfig = ExplorationConfig()
    reranking: RerankingConfig = RerankingConfig()
    budgets: BudgetConfig = BudgetConfig()
    recommend: RecommendConfig = RecommendConfig()
    state: StateConfig = StateConfig()
    experiments: ExperimentsConfig = ExperimentsConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()
    client: ClientConfig = ClientConfig()

    @model_validator(mode="after")
    def _check_consistency(self) -> "Config":
        if self.recommend.default_n > self.recommend.max_n:
            raise ValueError("recommend.default_n must not exceed recommend.max_n")
        if sum(self.retrieval.shares.values()) <= 0:
            raise ValueError("retrieval.shares must give at least one source a positive share")
        errors = self.reranking.position_errors(self.recommend.max_n)
        if errors:
            key, msg = errors[0]
            raise ValueError(f"reranking.{key}: {msg}")
        return self

    def with_overrides(self, overrides: dict[str, Any], source: str = "overrides") -> "Config":
        """A copy with nested overrides applied (validated like a file)."""
        merged = deep_merge(self.model_dump(mode="python"), overrides)
        return _validate(merged, source)


#: What SIGHUP and ``recsvc reload`` (ReloadRanker) apply from the re-read config file without a restart:
#: everything the request path reads per request (ranking, re-ranking, exploration policy, budgets, slate
#: sizes, the experiments file), the tokens and the logging. Anything else that changed is reported as needing
#: a restart and keeps its running value.
RELOADABLE = ("ranking", "reranking", "budgets", "recommend", "exploration", "experiments", "auth", "logging")
#: ... except these keys inside the sections above.
NOT_RELOADABLE = ("exploration.seed", "logging.requests", "experiments.cuped_pre_days")


def _leaves(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        here = f"{prefix}{key}"
        if isinstance(value, Mapping) and tuple(here.split(".")) not in DATA_MAPPINGS:
            out.update(_leaves(value, here + "."))
        else:
            out[here] = value
    return out


def reloaded(running: Config, fresh: Config) -> tuple[Config, list[str], list[str]]:
    """(the config to run with, reloadable keys that changed, changed keys that need a restart)."""
    old, new = _leaves(running.model_dump(mode="python")), _leaves(fresh.model_dump(mode="python"))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))

    def reloadable(key: str) -> bool:
        return key.split(".")[0] in RELOADABLE and not any(key == k or key.startswith(k + ".")
                                                          for k in NOT_RELOADABLE)

    applied = [k for k in changed if reloadable(k)]
    restart = [k for k in changed if not reloadable(k)]
    data = running.model_dump(mode="python")
    fresh_data = fresh.model_dump(mode="python")
    for section in RELOADABLE:
        data[section] = fresh_data[section]
    data["exploration"]["seed"] = running.exploration.seed
    data["logging"]["requests"] = running.logging.requests
    data["experiments"]["cuped_pre_days"] = running.experiments.cuped_pre_days
    return _validate(data, "reloaded config"), applied, restart


def _data_mappings(model: type[BaseModel], path: tuple[str, ...] = ()) -> frozenset[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found |= _data_mappings(field.annotation, path + (name,))
        elif get_origin(field.annotation) is dict:
            found.add(path + (name,))
    return frozenset(found)


#: Settings whose value is a mapping keyed by data (source names, item ids) rather than by config keys —
#: ``("retrieval", "shares")`` and ``("reranking", "pinned")``. :func:`deep_merge` replaces them whole.
DATA_MAPPINGS = _data_mappings(Config)


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with the overrides ``extra`` on top, the way a config file and experiment overrides apply.

    Sections merge key by key, at any depth; every other value is replaced whole, including the mappings
    in :data:`DATA_MAPPINGS`: overriding ``retrieval.shares = {ann = 1}`` means "the ANN source only", not
    "ANN's share is 1, the others unchanged". Neither argument is modified (unmerged values are shared).
    """
    return _merge_at((), base, extra)


def _merge_at(path: tuple[str, ...], base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        here = path + (key,)
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and here not in DATA_MAPPINGS:
            out[key] = _merge_at(here, out[key], value)
        else:
            out[key] = value
    return out


def _suggestion(loc: tuple) -> str:
    """``"; did you mean 'retrieval'?"`` for an unknown key close to a known one at the same place."""
    import difflib

    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        model = field.annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _validate(data: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = (f"unknown key{_suggestion(err['loc'])}" if err["type"] == "extra_forbidden" else err["msg"])
            if not err["loc"] and err["type"] == "value_error":
                # a check across sections (Config._check_consistency): its message names the key
                lines.append(f"{source}: {msg.removeprefix('Value error, ')}")
                continue
            lines.append(f"{source}: {key}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def read_toml(path: str | Path, *, what: str = "config file") -> dict[str, Any]:
    """Parse a TOML file. Every failure is a :class:`ConfigError` whose message starts with the path:
    ``<path>: <what> not found``, ``<path>: not valid TOML: ...``, ``<path>: cannot read the <what>: ...``.
    """
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{p}: {what} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib lets the decode error through
        raise ConfigError(f"{p}: not valid TOML: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:  # a directory, no permission, ...
        raise ConfigError(f"{p}: cannot read the {what}: {exc.strerror or exc}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML file (or nothing: the defaults) and apply ``overrides`` on top."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = read_toml(path)
        source = str(Path(path))
    if overrides:
        data = deep_merge(data, overrides)
    return _validate(data, source)


def defaults_as_toml() -> str:
    """The default configuration as commented TOML (for docs and `recsvc config`)."""
    return as_toml(Config())


def as_toml(cfg: Config, header: str = "recsvc configuration: every key with its default.") -> str:
    """``cfg`` as TOML, each key after its description (`recsvc config [--config FILE]`)."""
    lines: list[str] = [f"# {header}"]

    def emit(model: type[BaseModel], instance: BaseModel, prefix: str) -> None:
        scalars, sections = [], []
        for name, field in model.model_fields.items():
            value = getattr(instance, name)
            if isinstance(value, BaseModel):
                sections.append((name, type(value), value))
            else:
                scalars.append((name, field, value))
        if scalars:
            lines.append("")
            lines.append(f"[{prefix}]")
            for name, field, value in scalars:
                if field.description:
                    lines.append(f"# {field.description}")
                lines.append(f"{'# ' if value is None else ''}{name} = {_toml_value(value)}")
        for name, sub_model, value in sections:
            emit(sub_model, value, f"{prefix}.{name}" if prefix else name)

    emit(Config, cfg, "")
    return "\n".join(line for line in lines if line != "[]") + "\n"


def _toml_value(value: Any) -> str:
    if value is None:
        return '""  # unset'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        return f'"{value}"'
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return f'"{value}"'
