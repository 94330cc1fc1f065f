"""The ``batch`` section of an app's args: the Files and Batches API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MB = 1024 * 1024


class BatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description=(
        "serve /v1/files and /v1/batches: batches run on the app's engines, their "
        "files and state kept on the head (docs/batch.md)"))
    files_dir: str | None = Field(default=None, description=(
        "where uploaded, output and error files are kept (on an HPC system a shared "
        "or project file system); `hpcserve up` sets <home>/files"))
    store: str | None = Field(default=None, description=(
        "the files' and batches' metadata and progress (SQLite, on the head's own "
        "disk); `hpcserve up` sets <home>/batch.db"))
    max_file_bytes: int = Field(default=200 * MB, gt=0, description=(
        "largest upload (OpenAI's limit for batch input files: 200 MB)"))
    max_lines: int = Field(default=50_000, gt=0, description=(
        "requests per batch (OpenAI's limit: 50,000)"))
    max_concurrency: int = Field(default=64, gt=0, description=(
        "lines in flight at once over all batches and models, at most"))
    adaptive_concurrency: bool = Field(default=True, description=(
        "per model, send only as many lines as the engines start promptly (steered by "
        "the lines' time to first token), so interactive requests do not queue behind "
        "batch lines (docs/batch.md#interactive-traffic); false: always max_concurrency"))
    cancel_grace_s: float = Field(default=30.0, ge=0, description=(
        "after a cancel, lines already running may finish this long (their results go "
        "to the output file); then they are abandoned"))
    file_expiry_s: int = Field(default=30 * 86400, gt=0, description=(
        "uploaded batch files and batch results expire (are deleted) this long after "
        "their creation unless the upload asks for less (OpenAI's default: 30 days)"))

    def paths_missing(self) -> list[str]:
        return [name for name in ("files_dir", "store") if not getattr(self, name)]
