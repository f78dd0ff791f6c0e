"""Settings of the server processes (API and worker), read from MICROUPDATES_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from microupdates.artifact_store import DEFAULT_MAX_ARTIFACT_BYTES

DEFAULT_DATA_DIR = Path("var")
TASK_QUEUE = "microupdates"
DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_RECIPE_BYTES = 1024 * 1024


class ServerSettings(BaseSettings):
    """Settings shared by the API and the worker.

    `database_url` selects the application database: a SQLite file by default,
    or PostgreSQL (`postgresql+psycopg://...`) when several API or worker
    processes run.
    """

    model_config = SettingsConfigDict(env_prefix="MICROUPDATES_", extra="ignore")

    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str = ""
    artifact_dir: Path | None = None
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = TASK_QUEUE
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    temporal_connect_timeout_seconds: float = 60.0
    # Where the worker serves the Temporal SDK's Prometheus metrics; empty turns them off.
    worker_metrics_address: str = "127.0.0.1:9464"
    # How often each API process looks for deployments left pending without a workflow, and how
    # old such a row must be: a create request starts its workflow within a second.
    lost_start_check_seconds: float = 30.0
    # "text" for people, "json" for log collectors (one object per line, ids as fields).
    log_format: str = "text"
    # Ed25519 key that signs every stage job (PEM, PKCS#8). Unset: `<data_dir>/job-signing-key.pem`,
    # created at the first start. Every API process of one installation must use the same key.
    signing_key_file: Path | None = None
    # Certificate chain and private key (PEM) for serving the API over HTTPS; both or neither.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Size limits. A request body over its limit gets 413 before it is read
    # whole; a recipe over max_recipe_bytes (as JSON) gets 422.
    max_request_body_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BODY_BYTES, ge=1024)
    max_recipe_bytes: int = Field(default=DEFAULT_MAX_RECIPE_BYTES, ge=1024)
    max_artifact_bytes: int = Field(default=DEFAULT_MAX_ARTIFACT_BYTES, ge=1)

    @field_validator("log_format")
    @classmethod
    def check_log_format(cls, value: str) -> str:
        if value not in ("text", "json"):
            raise ValueError(f"unsupported log format {value!r}: use 'text' or 'json'")
        return value

    @field_validator("database_url")
    @classmethod
    def check_database_url(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgresql")):
            raise ValueError(
                f"unsupported database URL {value!r}: use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
            )
        return value

    @model_validator(mode="after")
    def check_tls_files(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "set both MICROUPDATES_TLS_CERT_FILE and MICROUPDATES_TLS_KEY_FILE to serve HTTPS, or neither"
            )
        for path in (self.tls_cert_file, self.tls_key_file):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} not found: give the path of a PEM file")
        return self

    def resolved_signing_key_file(self) -> Path:
        return (self.signing_key_file or self.data_dir / "job-signing-key.pem").resolve()

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'microupdates.db').resolve()}"

    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.data_dir / "artifacts").resolve()
