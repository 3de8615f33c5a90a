"""Typed configuration: one model of every knob, loaded from an environment's YAML and validated at start-up.

Environments (`local`, `cluster`, `databricks`) ship inside the package (`ebbtide/conf/<env>.yaml`, package data
found with importlib.resources, so they load from a wheel, a `--py-files` zip or an editable checkout alike);
any other YAML file is given by path.

Overrides come from the command line as dotted keys (``--set sessionize.session_gap_minutes=20``); values are
parsed as YAML scalars so numbers and booleans keep their types. Unknown keys, wrong types and bad values stop
the job with a message naming the key.
"""

from __future__ import annotations

import datetime as dt
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


def packaged_environments() -> dict[str, resources.abc.Traversable]:
    """The YAML files shipped in ebbtide/conf, by environment name."""
    conf = resources.files("ebbtide") / "conf"
    return {f.name[:-5]: f for f in conf.iterdir() if f.name.endswith(".yaml")}


class ConfigError(ValueError):
    """Configuration that cannot be used; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class SparkConf(_Strict):
    master: str = "local[*]"
    app_name: str = "ebbtide"
    # 0 = size to the cores (2 x default parallelism); a cluster sets a real number.
    shuffle_partitions: int = Field(0, ge=0)
    log_level: Literal["ERROR", "WARN", "INFO", "DEBUG"] = "WARN"
    ui_enabled: bool = True
    driver_memory: str = "4g"
    # Extra spark.* settings, passed through untouched (cluster tuning lives here).
    extra: dict[str, str] = Field(default_factory=dict)


class StorageConf(_Strict):
    # auto: delta-spark when its classes are on the JVM classpath, else delta-rs (the embedded default).
    engine: Literal["auto", "rs", "spark"] = "auto"
    # Path-addressed tables live under root/<table>. With `catalog`/`schema_name` set (Databricks, Unity Catalog)
    # tables are addressed as catalog.schema.table instead; that needs the spark engine.
    root: str = "data/tables"
    catalog: str | None = None
    schema_name: str | None = None
    # Users are hashed into this many buckets (the partition column of per-user tables). Fixed at table creation.
    user_buckets: int = Field(8, ge=1, le=65536)
    # Upper bound on rows per written Parquet file (Spark maxRecordsPerFile).
    max_rows_per_file: int = Field(1_000_000, ge=1000)
    vacuum_retention_hours: int = Field(168, ge=0)

    @model_validator(mode="after")
    def _catalog_needs_both(self) -> StorageConf:
        if (self.catalog is None) != (self.schema_name is None):
            raise ValueError("storage.catalog and storage.schema_name must be set together")
        if self.catalog is not None and self.engine == "rs":
            raise ValueError("storage.engine=rs cannot address catalog tables; use engine spark or auto")
        return self


class TablesConf(_Strict):
    events: str = "events"
    quarantine: str = "quarantine"
    sessions: str = "sessions"
    user_sequences: str = "user_sequences"
    item_vocab: str = "item_vocab"
    item_daily_counts: str = "item_daily_counts"
    event_redeliveries: str = "event_redeliveries"
    user_interest: str = "user_interest"
    item_embeddings: str = "item_embeddings"
    user_recommendations: str = "user_recommendations"


class GenerateConf(_Strict):
    out: str = "data/raw"
    format: Literal["json", "parquet"] = "json"
    start_date: dt.date = dt.date(2026, 11, 1)
    days: int = Field(7, ge=1, le=3650)
    users: int = Field(4000, ge=1)   # the same default as conf/local.yaml (the demo's size)
    items: int = Field(1000, ge=2)
    categories: int = Field(20, ge=1)
    zipf_exponent: float = Field(1.1, gt=0)
    sessions_per_user_day: float = Field(0.6, gt=0)
    events_per_session: float = Field(6.0, ge=1)
    seconds_between_events: float = Field(45.0, gt=0)
    # The planted ground truth: every event excites interest in its category, which decays with this half-life.
    interest_half_life_days: float = Field(2.0, gt=0)
    interest_excitation: float = Field(1.0, ge=0)     # per event, relative to the long-term taste (which sums to 1)
    novelty: float = Field(0.1, ge=0)                 # weight of a uniformly random category: new interests
    long_term_concentration: float = Field(0.3, gt=0)
    bad_record_rate: float = Field(0.0, ge=0, le=0.5)
    duplicate_rate: float = Field(0.0, ge=0, le=0.5)
    late_rate: float = Field(0.0, ge=0, le=0.5)
    missing_event_id_rate: float = Field(0.1, ge=0, le=1)
    users_per_chunk: int = Field(5000, ge=1)
    seed: int = 7

    @model_validator(mode="after")
    def _items_cover_categories(self) -> GenerateConf:
        if self.items < self.categories:
            raise ValueError(f"generate.items ({self.items}) must be >= generate.categories ({self.categories})")
        return self


class SessionizeConf(_Strict):
    input: str = "data/raw"
    format: Literal["json", "parquet", "csv"] = "json"
    # How numeric timestamps are read: a fixed unit, or inferred per value from its magnitude.
    epoch_unit: Literal["auto", "s", "ms", "us"] = "auto"
    # Events before this are quarantined (historical backfills lower it).
    ts_floor: dt.date = dt.date(2000, 1, 1)
    # Events later than the end of the run date plus this many days are quarantined as clock-skewed.
    max_future_days: int = Field(1, ge=0)
    # Accepted event types and their default weights (used when a record carries no weight).
    event_types: dict[str, float] = Field(
        default_factory=lambda: {"view": 1.0, "click": 2.0, "cart": 3.0, "purchase": 5.0})
    session_gap_minutes: float = Field(30.0, gt=0)
    max_session_minutes: float = Field(240.0, gt=0)
    max_len: int = Field(200, ge=1, le=100_000)
    max_field_chars: int = Field(256, ge=8)
    # Longer records are quarantined (oversize_field); quarantine keeps this many chars, their length and SHA-256.
    max_record_chars: int = Field(8192, ge=64)
    # A day folder without a single record is refused (an empty delivery would otherwise erase that day's events);
    # set true to accept it and make the day empty.
    allow_empty_input: bool = False
    # Where a run looks for earlier copies of its event ids (a redelivery): the event_date partitions within this many
    # days of the batch's own event dates. A copy with the same timestamp always lies in its own date, so only a
    # copy whose timestamp was corrected by more than this is missed (both copies are then kept). null searches the
    # whole table: exact, but every run then reads every event id ever kept (cost grows with history).
    dedup_lookback_days: int | None = Field(7, ge=0)

    @field_validator("event_types")
    @classmethod
    def _types_nonempty(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("at least one event type is required")
        bad = [k for k, w in value.items() if not k or w <= 0]
        if bad:
            raise ValueError(f"event types need a non-empty name and a positive weight: {bad}")
        return value

    @model_validator(mode="after")
    def _session_bounds(self) -> SessionizeConf:
        if self.max_session_minutes < self.session_gap_minutes:
            raise ValueError("sessionize.max_session_minutes must be >= sessionize.session_gap_minutes")
        return self


ModelName = Literal["decay_pool", "gru", "lstm", "decay_transformer", "long_short"]
# The constructor options each model takes (models/__init__.py builds them); train.model_settings may set these.
MODEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "decay_pool": ("dropout", "half_lives_days"),
    "gru": ("dropout", "layers"),
    "lstm": ("dropout", "layers"),
    "decay_transformer": ("dropout", "layers", "heads"),
    "long_short": ("dropout", "half_lives_days"),
}
# Training knobs a model's settings may override (the train section holds the shared values).
TRAINING_OVERRIDES = ("lr", "weight_decay", "epochs", "patience", "batch_size", "warmup_steps", "window_context")


class ModelSettings(_Strict):
    """train.model_settings.<model>: that model's options and its overrides of the shared training knobs."""

    dropout: float | None = Field(None, ge=0, lt=1)
    layers: int | None = Field(None, ge=1, le=12)
    heads: int | None = Field(None, ge=1, le=16)
    half_lives_days: list[float] | None = None
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    epochs: int | None = Field(None, ge=1)
    patience: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    warmup_steps: int | None = Field(None, ge=0)
    window_context: int | None = Field(None, ge=0)

    @field_validator("half_lives_days")
    @classmethod
    def _positive_half_lives(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(h <= 0 for h in value)):
            raise ValueError("half_lives_days must be a non-empty list of positive days")
        return value


class TrainConf(_Strict):
    models: list[ModelName] = Field(
        default_factory=lambda: ["decay_pool", "gru", "decay_transformer", "long_short"])
    output: str = "data/models"          # one folder per model and version
    dim: int = Field(64, ge=4)
    max_len: int = Field(50, ge=2)       # events per training window / history fed to the models
    # Training windows overlap by this many events, so (beyond a history's first events) every target is
    # predicted from at least this much context; 0 = plain tiling; unset = max_len // 4. See feed.py.
    window_context: int | None = Field(None, ge=0)
    epochs: int = Field(60, ge=1)
    max_steps: int = Field(0, ge=0)      # 0 = no cap; else stop after this many optimizer steps in total
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    decay_lr_multiplier: float = Field(10.0, gt=0)   # learning-rate factor for the time-scale parameters
    weight_decay: float = Field(0.0, ge=0)          # on dense layers only: never on embeddings or time scales
    warmup_steps: int = Field(20, ge=0)
    clip_norm: float = Field(1.0, gt=0)
    # Full softmax up to this many items; above it, sampled softmax with log-Q correction and in-batch negatives.
    full_softmax_max_items: int = Field(50_000, ge=1)
    shuffle_buffer: int = Field(1024, ge=0)
    # petastorm reader pool. "dummy" decodes in the training thread: deterministic, and on a 2-core host as fast as
    # a thread (the padding transform holds the GIL); under load we saw petastorm's thread pool end a reader early
    # (a shard read empty or half-read), so small hosts use dummy. "thread"/"process" scale on many-core hosts.
    reader_workers: int = Field(1, ge=1)
    reader_pool: Literal["dummy", "thread", "process"] = "dummy"
    seed: int = 13
    log_every: int = Field(20, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    patience: int = Field(10, ge=1)       # epochs without validation NDCG@10 gain before early stop
    resume: bool = True
    num_processes: int = Field(1, ge=1)   # >1: DDP through TorchDistributor
    use_gpu: bool = False
    split: Literal["temporal", "leave_one_out"] = "temporal"
    # temporal split: train before cutoff (default: last data day - val_days - test_days + 1)
    cutoff: dt.date | None = None
    val_days: int = Field(1, ge=1)
    test_days: int = Field(1, ge=1)
    # Per model; these defaults were tuned on MovieLens 100k (make bench-quality) and suit data of that shape.
    model_settings: dict[ModelName, ModelSettings] = Field(default_factory=lambda: {
        "decay_pool": ModelSettings(dropout=0.1, half_lives_days=[0.1, 1.0, 10.0], lr=0.01),
        "gru": ModelSettings(dropout=0.2, lr=0.003),
        "lstm": ModelSettings(dropout=0.2, lr=0.003),
        "decay_transformer": ModelSettings(dropout=0.2, layers=2, heads=2, lr=0.003, warmup_steps=40),
        "long_short": ModelSettings(dropout=0.1, half_lives_days=[1.0, 30.0], lr=0.003)})

    @model_validator(mode="after")
    def _settings_fit(self) -> TrainConf:
        for name, settings in self.model_settings.items():
            given = settings.model_dump(exclude_none=True)
            wrong = [k for k in given if k not in MODEL_OPTIONS[name] and k not in TRAINING_OVERRIDES]
            if wrong:
                raise ValueError(f"model_settings.{name}: {wrong} do not apply to {name} "
                                 f"(options: {list(MODEL_OPTIONS[name])}, overrides: {list(TRAINING_OVERRIDES)})")
        for name in self.models:
            context = self.for_model(name)[0].window_context
            if context > self.max_len - 2:
                raise ValueError(f"window_context ({context}) must be <= max_len - 2 ({self.max_len - 2})")
        return self

    def for_model(self, name: str) -> tuple[TrainConf, dict[str, Any]]:
        """This model's training settings (shared values with its overrides) and its constructor options."""
        given = self.model_settings[name].model_dump(exclude_none=True) if name in self.model_settings else {}
        overrides = {k: v for k, v in given.items() if k in TRAINING_OVERRIDES}
        options = {k: v for k, v in given.items() if k in MODEL_OPTIONS[name]}
        merged = self.model_dump()
        merged.update(overrides, model_settings={})
        if merged["window_context"] is None:
            merged["window_context"] = merged["max_len"] // 4
        return TrainConf.model_construct(**merged), options


class EvaluateConf(_Strict):
    ks: list[int] = Field(default_factory=lambda: [10, 20])
    exclude_seen: bool = True
    # The baselines' half-lives (decayed popularity, SAR affinity) are chosen from these on the validation split.
    baseline_half_lives_days: list[float] = Field(default_factory=lambda: [0.5, 2.0, 7.0, 30.0, 180.0, 1000.0])
    output: str = "data/reports"

    @field_validator("ks")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("ks must be a non-empty list of positive cut-offs")
        return sorted(set(value))

    @field_validator("baseline_half_lives_days")
    @classmethod
    def _positive_days(cls, value: list[float]) -> list[float]:
        if not value or any(h <= 0 for h in value):
            raise ValueError("baseline_half_lives_days must be a non-empty list of positive days")
        return value


class NightlyConf(_Strict):
    model: ModelName = "decay_pool"
    # An artifact folder or version name; default: the promoted version of `model` (`ebbtide promote`).
    model_version: str | None = None
    # promoted: follow the pointer `ebbtide promote` writes (production); latest: newest folder (the demo only).
    follow: Literal["promoted", "latest"] = "promoted"
    # Refuse a date whose sessionized data is missing or stale (no sessionize run for it, a gap the day before,
    # or later dates loaded first); --allow-stale turns it off for one run.
    require_fresh: bool = True
    # Users with fewer events than this get the decayed-popularity fallback instead of the model's list.
    min_events_for_model: int = Field(2, ge=1)
    # The last slots of each model list go to the most popular items newer than the model (0 = none).
    new_item_slots: int = Field(2, ge=0)
    popularity_half_life_days: float = Field(2.0, gt=0)
    # `ebbtide maintain` expires user_recommendations partitions and user_interest rows older than these.
    recommendations_retention_days: int = Field(30, ge=1)
    interest_retention_days: int = Field(180, ge=1)
    top_k: int = Field(20, ge=1)
    retention_days: int = Field(30, ge=1)   # users with an event in this horizon get an embedding
    batch_size: int = Field(1024, ge=1)
    # Top-K (README "Nightly", "Sizing"): exact = every item, in blocks; ann = a faiss IVF index proposes
    # candidates that are re-scored exactly (needs the `ann` extra: faiss-cpu, or faiss-gpu on GPU clusters).
    topk: Literal["exact", "ann"] = "exact"
    # auto: CUDA when torch sees a GPU (half-precision product, on-device top-K), else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # MiB one Python worker's top-K of a batch may hold besides the model: score block, chunk maxima, candidates,
    # running lists, on a GPU also the half-precision catalog when it fits in half of it. Sets the item block.
    topk_memory_mb: int = Field(256, ge=1)
    ann_lists: int = Field(0, ge=0)      # IVF lists; 0 = about 2*sqrt(items)
    ann_nprobe: int = Field(64, ge=1)    # lists searched per user (recall vs speed: bench/bench_topk.py)
    ann_rerank: int = Field(5, ge=1)     # candidates re-scored exactly per user, in multiples of top_k
    exclude_consumed: bool = True
    incremental: bool = True

    @model_validator(mode="after")
    def _slots_fit(self) -> NightlyConf:
        if self.new_item_slots >= self.top_k:
            raise ValueError(f"nightly.new_item_slots ({self.new_item_slots}) must be < nightly.top_k ({self.top_k})")
        return self


class Config(_Strict):
    env: str = "local"
    spark: SparkConf = Field(default_factory=SparkConf)
    storage: StorageConf = Field(default_factory=StorageConf)
    tables: TablesConf = Field(default_factory=TablesConf)
    generate: GenerateConf = Field(default_factory=GenerateConf)
    sessionize: SessionizeConf = Field(default_factory=SessionizeConf)
    train: TrainConf = Field(default_factory=TrainConf)
    evaluate: EvaluateConf = Field(default_factory=EvaluateConf)
    nightly: NightlyConf = Field(default_factory=NightlyConf)

    @model_validator(mode="after")
    def _window_fits(self) -> Config:
        if self.train.max_len > self.sessionize.max_len:
            raise ValueError(f"train.max_len ({self.train.max_len}) cannot exceed sessionize.max_len "
                             f"({self.sessionize.max_len}): sequences keep only that many events")
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def _format_errors(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        scalar = not isinstance(item.get("input"), (dict, list))
        lines.append(f"  {key}: {msg} (got {item.get('input')!r})" if scalar and item["type"] != "extra_forbidden"
                     else f"  {key}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_config(env: str | Path = "local", overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a packaged environment by name (or a YAML path), apply dotted overrides, validate."""
    source, text = _read_environment(env)
    tree = yaml.safe_load(text) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in items:
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format_errors(err)}") from None


def _read_environment(env: str | Path) -> tuple[str, str]:
    """(name for messages, YAML text) of a packaged environment name or a file path."""
    text_env = str(env)
    looks_like_path = isinstance(env, Path) or text_env.endswith((".yaml", ".yml")) or "/" in text_env
    if looks_like_path:
        path = Path(env)
        if not path.is_file():
            raise ConfigError(f"no configuration file {path}")
        return path.name, path.read_text()
    known = packaged_environments()
    if text_env not in known:
        raise ConfigError(f"no configuration {text_env!r} (known environments: {', '.join(sorted(known))}; "
                          "or give a YAML file path)")
    return f"{text_env}.yaml", known[text_env].read_text()
