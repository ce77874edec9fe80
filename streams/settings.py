"""The one typed settings object; nothing else in the project reads the environment.

Every field is read from an ``INTEREST_``-prefixed variable (``INTEREST_WINDOW_LENGTH=50``).
Where the broker or Redis address is not set, the addresses written by ``interest up`` are used,
so the embedded dev stack works without exporting anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from common.errors import UserError
from encoder.features import EVENT_TYPES, parse_event_types

STACK_FILE_NAME = "stack.json"


def default_home() -> Path:
    return Path.home() / ".interest"


class StackFileSource(PydanticBaseSettingsSource):
    """Values `interest up` recorded (addresses, timings suited to the embedded broker).

    Ranked below the environment: an explicit INTEREST_* variable always wins.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns everything at once

    def __call__(self) -> dict[str, Any]:
        home = Path(os.environ.get("INTEREST_HOME") or default_home())
        try:
            recorded = json.loads((home / STACK_FILE_NAME).read_text())
        except (OSError, ValueError):
            return {}
        fields = self.settings_cls.model_fields
        return {name: value for name, value in recorded.items() if name in fields}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INTEREST_", extra="ignore", frozen=True)

    # Where `interest up` keeps its state file, logs and pids.
    home: Path = Field(default_factory=default_home)

    # Kafka. Unset means what `interest up` recorded, else the Kafka default port.
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    topic_clicks: str = "clicks"
    topic_purchases: str = "purchases"
    topic_recommendations: str = "recommendations"
    topic_dlq: str = "events.dlq"
    topic_partitions: int = Field(default=4, ge=1)
    topic_replication: int = Field(default=1, ge=1)
    group_id: str = "interest-stream"

    # Redis. Unset means what `interest up` recorded. TLS: use a rediss:// URL.
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_ssl_ca_certs: Path | None = None
    redis_key_prefix: str = "is"
    # redis_url names one node of a Redis Cluster; the client finds the others from it.
    redis_cluster: bool = False
    # Idle users' state expires after this many seconds (0 keeps it forever).
    state_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=0)

    # Rolling window and recommendations.
    window_length: int = Field(default=200, ge=1, le=10_000)
    window_max_age_seconds: float | None = Field(default=None, gt=0)
    top_k: int = Field(default=10, ge=1, le=1000)
    popularity_half_life_seconds: float = Field(default=6 * 3600, gt=0)
    # An exported encoder bundle (`interest export`); unset serves the popularity baseline.
    # The worker polls it for a new version (rollout) every model_poll_seconds.
    model: Path | None = None
    model_poll_seconds: float = Field(default=5.0, gt=0)
    # Re-ranks the encoder's scores by -penalty * log(1 + the item's training events), the
    # same re-ranking `interest evaluate --popularity-penalty` measures (encoder/popularity.py):
    # 0 ranks as trained; larger values recommend more of the long tail at some accuracy.
    popularity_penalty: float = Field(default=0.0, ge=0, le=100)
    # Seen items of these event types are not recommended again (comma-separated; empty: any
    # seen item may be): "purchase" lets a shop show again what a user viewed, carted or
    # favourited. `interest evaluate` ranks under the same rule (streams/seen_items.py).
    exclude_seen_types: Annotated[tuple[str, ...], NoDecode] = EVENT_TYPES
    # Content vectors of the item catalogue (`interest catalogue --out`): items the model does
    # not know are ranked through the bundle's content map (streams/catalogue.py). Re-read
    # when the file changes, checked every model_poll_seconds.
    catalogue: Path | None = None
    # Recommended item slots the worker's popularity-bias gauges look back over
    # (interest_recommendation_coverage, interest_recommendation_long_tail_share).
    exposure_window: int = Field(default=50_000, ge=100)
    # Per-user incremental encoder states kept in worker memory (LRU; tens of KB each).
    state_cache_users: int = Field(default=10_000, ge=0)
    # Users as last read or written (window, offsets, vector, recs) kept in worker memory
    # (LRU); a batch re-reads a user from Redis only when another writer changed it since.
    window_cache_users: int = Field(default=20_000, ge=0)
    # Threads for inference off the event loop.
    inference_threads: int = Field(default=1, ge=1)

    # Recommendation events carry, per item, the user's events that drove it with the model's
    # weights (streams/explain.py): the top `explain_events` of them. Off by default: it costs
    # a rebuild of the user's window per event (bench/stream.py measures it).
    explain: bool = False
    explain_events: int = Field(default=3, ge=1, le=20)

    # Longest a fetch waits on the broker when there is no new data (faust hard-codes 1500 ms).
    # Kafka answers as soon as data arrives, so this only paces empty polls there; the embedded
    # broker holds a fetch for the whole wait, adding it to latency.
    kafka_fetch_max_wait_ms: int = Field(default=50, ge=1, le=30_000)

    # Micro-batching in the worker: at most batch_size events; while another batch is being
    # computed, a batch waits to fill until its oldest event has waited batch_within_seconds
    # (with none computing it is taken at once; streams/transport.py FetchSink.take). Large
    # batches spread what each batch costs once over more events, which raises the rate from a
    # backlog without adding latency at a fixed rate (bench/stream.py); under light load
    # batches stay small. It also sets the consumer's read-ahead (broker_max_poll_records, the
    # fetch sink: 2x batch_size).
    batch_size: int = Field(default=2000, ge=1)
    batch_within_seconds: float = Field(default=0.02, gt=0)

    # Validation limits.
    max_id_length: int = Field(default=256, ge=1)
    max_event_bytes: int = Field(default=64 * 1024, ge=256)
    dlq_raw_max_bytes: int = Field(default=4096, ge=64)

    # HTTP ingest endpoint (`interest serve`).
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8088, ge=0, le=65535)
    http_token: SecretStr | None = None
    http_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    http_max_events_per_request: int = Field(default=10_000, ge=1)

    # Consumer group timing: Kafka's defaults. A worker that does not poll within the interval
    # is dropped from the group. The embedded broker completes a group join only after about
    # half this interval, so `interest up` records shorter values for dev use.
    kafka_session_timeout_seconds: float = Field(default=45.0, gt=0)
    kafka_max_poll_interval_seconds: float = Field(default=300.0, gt=0)
    # How long a batch waits for the broker to acknowledge its output before it is retried.
    kafka_delivery_timeout_seconds: float = Field(default=30.0, gt=0)
    # Largest record batch the worker's producer builds per partition. aiokafka's default
    # (16 KiB, a few dozen recommendations) splits one micro-batch's output into many record
    # batches, and aiokafka sends one batch per partition per request, one request per broker
    # at a time: many round trips per micro-batch under load.
    # Keep it at or below the topics' max.message.bytes (Kafka's default: 1 MiB).
    kafka_max_batch_bytes: int = Field(default=512 * 1024, ge=16 * 1024, le=64 * 1024 * 1024)

    # Worker observability: Prometheus /metrics on this port (0 disables it).
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    # "json": one JSON object per log line (streams/logs.py), for log shippers.
    log_format: Literal["text", "json"] = "text"

    @field_validator("exclude_seen_types", mode="before")
    @classmethod
    def _event_types(cls, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            return parse_event_types(value)
        if isinstance(value, list | tuple | set | frozenset):
            return parse_event_types(",".join(str(v) for v in value))
        raise ValueError("expected event type names, comma-separated")

    @model_validator(mode="after")
    def _check_security(self) -> Settings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                "INTEREST_SECURITY_PROTOCOL=SASL_* needs INTEREST_SASL_MECHANISM, "
                "INTEREST_SASL_USERNAME and INTEREST_SASL_PASSWORD"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, StackFileSource(settings_cls))

    @property
    def stack_file(self) -> Path:
        return self.home / STACK_FILE_NAME

    @property
    def input_topics(self) -> tuple[str, str]:
        return (self.topic_clicks, self.topic_purchases)

    def kafka_client_options(self) -> dict[str, object]:
        """Security options in the spelling aiokafka and kafka-python share."""
        options: dict[str, object] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        if self.security_protocol in ("SSL", "SASL_SSL"):
            import ssl

            try:
                context = ssl.create_default_context(
                    cafile=str(self.ssl_cafile) if self.ssl_cafile else None
                )
                if self.ssl_certfile:
                    context.load_cert_chain(
                        str(self.ssl_certfile), str(self.ssl_keyfile) if self.ssl_keyfile else None
                    )
            except (OSError, ssl.SSLError) as exc:
                raise UserError(
                    f"cannot use the Kafka TLS files in INTEREST_SSL_*: {exc}"
                ) from None
            options["ssl_context"] = context
        return options


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment; keyword overrides win (used by the CLI and tests)."""
    return Settings(**overrides)  # type: ignore[arg-type]
