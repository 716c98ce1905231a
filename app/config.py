"""One validated Settings object, read from the environment or `.env`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

from limits import parse_many
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "default"
_SECRET_SETTINGS = {"ADMIN_API_KEY", "DATABASE_URL", "REDIS_URL"}


class Settings(BaseSettings):
    """Every setting of the service; environment variables use the upper-case field names."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    data_dir: Path = Path("data")
    database_url: str | None = None
    """SQLAlchemy URL; unset means SQLite under `data_dir`."""
    redis_url: str | None = None
    """Unset: the embedded broker (SQLite) and in-process fallbacks; set: Redis for all of them."""
    model: str = DEFAULT_MODEL
    """`default` (SmolLM2-135M-Instruct, prepared from its PyPI wheel) or a causal LM directory."""
    model_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Serving dtype; `auto` is bfloat16 where the CPU has it natively, else float32."""
    kv_cache_dtype: Literal["float32", "bfloat16"] = "float32"
    """What the KV cache holds keys and values in on the Llama-family decode path. bfloat16
    takes half the memory a token (twice the requests in KV_CACHE_BYTES) and speeds attention
    over long prompts on a CPU with native bfloat16, but slows short chats' steps and changes
    answers about as much as bfloat16 weights do (docs/serving.md)."""
    admin_api_key: str | None = None
    """The bootstrap admin key; unset means one is generated on first start and kept in data_dir."""
    max_prompt_chars: Annotated[int, Field(ge=1)] = 16_000
    """Longest accepted input text (prompt, text, question plus context), in characters."""
    log_level: str = "INFO"

    training_interval: Annotated[float, Field(gt=0)] = 3600
    """Seconds between scheduled training rounds."""
    training_min_items: Annotated[int, Field(ge=1)] = 16
    """Fewest new usable ratings a round trains on; with fewer it is skipped."""
    training_max_per_rater: Annotated[int, Field(ge=1)] = 64
    """Most ratings one rater contributes to a round (their newest)."""
    training_holdout_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2
    """Newest share of a round's ratings kept back for the promotion gate."""
    training_max_rater_share: Annotated[float, Field(ge=0.5, le=1)] = 0.5
    """Largest share of a round one rater may hold when others rated too, their newest kept
    (0.5: no more than all the others together; 1 turns the cap off)."""
    training_consensus_min_others: Annotated[int, Field(ge=2)] = 2
    """Other raters an item needs before it tests a rater against their majority (2 or more, so
    that no single key can outvote an honest rater)."""
    training_consensus_min_items: Annotated[int, Field(ge=1)] = 5
    """Such tested items a rater needs before the consensus rule may leave them out."""
    training_consensus_max_disagreement: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Share of their tested items a rater may vote against the others' majority on; above it the
    round leaves all their ratings out (1 turns the rule off)."""
    training_stale_after: Annotated[float, Field(gt=0)] = 600
    """A running round with no heartbeat for this many seconds is declared lost (a round beats
    from a thread every quarter of this, at most every 30 s, whatever it is doing), and so is a
    queued one that no worker started in this time (its task was lost)."""
    training_max_row_failures: Annotated[int, Field(ge=1)] = 2
    """Failed rounds a rating may be in before it is set aside: a round that fails while it
    computes on a batch in training or the gate (an error, MemoryError, or its worker lost)
    counts one against the ratings of that batch only (a failure outside any batch, no rating);
    at this many, no later round takes the rating, the run's reason says so, and an admin can
    restore it (`POST /v1/feedback/{id}/restore`)."""
    training_max_seconds: Annotated[float, Field(gt=0)] = 3 * 3600
    """Longest a round may run, from the moment its worker claimed it. Past it, its heartbeat
    stops (a worker that hangs while alive then goes stale and is declared lost after
    TRAINING_STALE_AFTER, so that the next round can start), and the round itself, if it is
    still making progress, stops at its next check and publishes nothing."""
    training_visibility_timeout: Annotated[float, Field(gt=0)] = 6 * 3600
    """Seconds Redis keeps a task for the worker that took it before it hands it to another
    (Celery's `visibility_timeout`); it must exceed TRAINING_MAX_SECONDS, the longest round, or a
    second worker gets the same round (it then exits: only the worker that claimed a queued round
    runs it)."""
    training_max_length: Annotated[int, Field(ge=16, le=32_768)] = 512
    """Prompt plus answer tokens a rating is trained and gated on (the one truncation rule,
    `TokenBudget.truncate`): no sequence the worker computes on is longer."""
    training_max_prompt_tokens: Annotated[int, Field(ge=1)] = 256
    """Prompt tokens kept, its last ones; the answer keeps the rest of TRAINING_MAX_LENGTH. A
    correction longer than TRAINING_MAX_LENGTH - TRAINING_MAX_PROMPT_TOKENS - 1 tokens (255) is
    refused with a 422, so that no correction is ever cut."""
    training_batch_tokens: Annotated[int, Field(ge=32)] = 1024
    """Padded tokens in one forward pass of the gate and in one training micro-batch (a
    training row is two sequences of up to TRAINING_MAX_LENGTH: DPO's chosen and rejected
    answers, KTO's answer and its KL term's; an optimiser step still covers the round's
    `batch_size` rows, by gradient accumulation); at least twice TRAINING_MAX_LENGTH. It bounds
    the worker's memory beyond its two model copies: backward keeps about 1.7 MiB per token of
    a micro-batch on the default model in float32 with activation checkpointing on (3 without);
    `bench/abuse.py --phase round` prints the worker's peak."""
    training_chunk_tokens: Annotated[int, Field(ge=1, le=8192)] = 256
    """Positions projected to vocabulary logits at once when the gate computes log-probabilities:
    its logits never exceed this many x vocabulary floats (256 x 49,152 x 4 bytes = 48 MiB on
    the default model), however long or many the sequences."""
    training_reward_model: bool = True
    """Whether every round also trains a reward model on its ratings (pairs and thumbs/stars),
    measures it on the held-out ones (accuracy, Brier, ECE, on the run) and keeps it, verified,
    in DATA_DIR/reward_models/; it costs a round about as much again as a KTO phase."""
    evaluation_dir: Path | None = None
    """Folder of the evaluation suite every round's candidate (and its parent) is scored on:
    `references.jsonl` and `prompts.jsonl`; unset: the project's own, in
    worker/training/evaluation/. Figures compare only between versions on the same files."""
    max_batch_size: Annotated[int, Field(ge=1, le=256)] = 32
    """Requests decoding together in one batch; more wait in the queue."""
    max_waiting_requests: Annotated[int, Field(ge=1, le=10_000)] = 64
    """Generation requests allowed to wait for the model; beyond, a 429 with Retry-After."""
    max_prompt_tokens: Annotated[int, Field(ge=1)] = 4096
    """Longest prompt in tokens, counted after the chat template; beyond, a 422 that says so."""
    kv_cache_bytes: Annotated[int, Field(ge=2**20)] = 2 * 2**30
    """Memory the KV caches of all running requests of an API process may take, in bytes. A
    request needs about (prompt + max_new_tokens) x 45 KiB on the default model, and a batch is
    as wide as its longest row; a request that does not fit waits for running ones to finish,
    and one that could never fit gets a 422. More allows more long requests at once; each GiB
    is resident memory."""
    kv_cache_key_share: Annotated[float, Field(gt=0, le=1)] = 0.25
    """Share of KV_CACHE_BYTES one API key's running requests may reserve; its next request
    waits beyond it (one request alone always may run), so one key's long prompts cannot fill
    the cache and the time every step spends reading it. 1 turns it off."""
    max_requests_per_key: Annotated[int, Field(ge=1)] = 8
    """Generation requests one API key may have waiting or running at once; beyond, a 429."""
    prefill_chunk_tokens: Annotated[int, Field(ge=16, le=4096)] = 256
    """Prompts longer than this are prefilled this many tokens at a time, between decode steps
    of the running requests: smaller keeps their tokens flowing more evenly while a long prompt
    arrives, larger gives that prompt its first token sooner."""
    swap_poll_interval: Annotated[float, Field(gt=0)] = 0.25
    """Seconds between checks of the database for a newly active version."""
    swap_preallocate: bool = True
    """Keep spare copies of the weights allocated, so that a swap writes into memory already
    mapped instead of allocating it (about 1 s more on this machine). Only where versions are
    merged copies (architectures outside the Llama family): each API process then holds three
    copies of the weights, the base, the active version and one spare."""
    rate_limit_generation: str | None = "120/minute"
    """Generation requests per API key (generate, translate, qa, completions), as `120/minute` or
    `10/second;1000/hour`; `none` or empty turns it off. Beyond it, a 429 with Retry-After."""
    rate_limit_feedback: str | None = "600/minute"
    """Ratings and comparisons per API key, in the same notation as RATE_LIMIT_GENERATION."""
    rate_limit_read: str | None = "600/minute"
    """Reads per API key (every GET under /v1: generations, export, stats, models, runs, keys),
    in the same notation as RATE_LIMIT_GENERATION."""
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1_048_576
    """Largest accepted request body in bytes; a larger one gets a 413."""

    @field_validator("database_url", "redis_url", "admin_api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("rate_limit_generation", "rate_limit_feedback", "rate_limit_read")
    @classmethod
    def _rate_limit(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() in ("", "none"):
            return None
        try:
            parse_many(value)
        except ValueError:
            raise ValueError(
                "must be like '120/minute' or '10/second;1000/hour', or 'none' for no limit"
            ) from None
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:// or postgresql+psycopg:// URL")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// URL")
        return value

    @field_validator("admin_api_key")
    @classmethod
    def _strong_admin_key(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @field_validator("model")
    @classmethod
    def _model_dir_exists(cls, value: str) -> str:
        if value != DEFAULT_MODEL and not (Path(value) / "config.json").is_file():
            raise ValueError(f"{value!r} is not a model directory with a config.json")
        return value

    # Per field (fields validate in order, so the length is known): an error then names the
    # setting and echoes only its value.
    @field_validator("training_max_prompt_tokens")
    @classmethod
    def _prompt_leaves_room(cls, value: int, info: ValidationInfo) -> int:
        if value >= info.data.get("training_max_length", value + 1):
            raise ValueError("must be below TRAINING_MAX_LENGTH, to leave the answer room")
        return value

    @field_validator("training_visibility_timeout")
    @classmethod
    def _visibility_outlasts_a_round(cls, value: float, info: ValidationInfo) -> float:
        if value <= info.data.get("training_max_seconds", 0):
            raise ValueError(
                "must exceed TRAINING_MAX_SECONDS, or Redis hands a running round to a second "
                "worker"
            )
        return value

    @field_validator("training_batch_tokens")
    @classmethod
    def _batch_holds_two_rows(cls, value: int, info: ValidationInfo) -> int:
        if value < 2 * info.data.get("training_max_length", 0):
            raise ValueError("must be at least twice TRAINING_MAX_LENGTH (KTO pairs rows)")
        return value

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL in effect."""
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'feedback.db'}"

    @property
    def celery_urls(self) -> tuple[str, str]:
        """(broker, result backend): Redis when set, else SQLite files in the data directory."""
        if self.redis_url:
            return self.redis_url, self.redis_url
        # kombu's SQLAlchemy transport and Celery's database backend need no server.
        data_dir = self.data_dir.resolve()
        return f"sqla+sqlite:///{data_dir / 'broker.db'}", f"db+sqlite:///{data_dir / 'results.db'}"

    @property
    def admin_key_file(self) -> Path:
        """Where a generated bootstrap admin key is kept (owner-readable only)."""
        return self.data_dir / "admin_key"

    @property
    def reward_models_dir(self) -> Path:
        """Where rounds keep their reward models, one verified directory each."""
        return self.data_dir / "reward_models"

    @property
    def versions_dir(self) -> Path:
        """Where trained versions (adapters with manifests) live."""
        return self.data_dir / "versions"

    @property
    def models_dir(self) -> Path:
        """Where prepared base models live."""
        return self.data_dir / "models"


def load_settings(**overrides: object) -> Settings:
    """Read Settings; a wrong one stops the process with one line that names it."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]).upper() if first["loc"] else "settings"
        # Settings that may hold a secret are named but never echoed.
        shown = "" if name in _SECRET_SETTINGS else f" (got {first.get('input')!r})"
        sys.stderr.write(f"invalid setting {name}: {first['msg']}{shown}\n")
        raise SystemExit(2) from None
