"""What one Ray actor does: build its backend once, then run blocks of rows into part files.

A block runs through ``run_batch_file``, the runner of local mode: the same scheduler (many
programs in flight), the same conversions, time limits and error records, so a record here is
byte for byte the record local mode writes. A part is written under a temporary name in the
output directory, flushed and renamed: it exists whole or not at all, and its name (block and
run fingerprint) is the same on every attempt, so a block that runs twice (its first worker
died) still leaves one part.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from sglrun.batch.runner import run_batch_file
from sglrun.batch.writers import encode_record
from sglrun.ray.inputs import Block, open_block

if TYPE_CHECKING:
    from sglrun.lang.backend import Backend
    from sglrun.lang.call_cache import CallCache
    from sglrun.lang.function import SglFunction
    from sglrun.lang.ir import SamplingParams

__all__ = [
    "BlockWorker",
    "RunOptions",
    "WorkerParts",
    "close_parts",
    "part_name",
    "write_part",
]

PART_PREFIX = "part-"
TEMP_SUFFIX = ".sglrun-tmp"


@dataclass
class WorkerParts:
    """What a worker builds once, in its own process (a model loads there, not on the driver)."""

    program: SglFunction
    backend: Backend
    concurrency: int
    defaults: SamplingParams
    cache: CallCache | None = None


@dataclass(frozen=True)
class RunOptions:
    """How rows become records: the flags of local mode that shape a record."""

    include: frozenset[str] = frozenset()
    mapping: dict[str, str] | None = None
    strict: bool = False
    id_field: str | None = None
    json_values: bool = False
    row_timeout: float | None = None
    input_columns: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def part_name(block: str, fingerprint: str, fmt: str) -> str:
    return f"{PART_PREFIX}{block}-{fingerprint}.{fmt}"


def write_part(directory: str, name: str, records: list[dict[str, Any]], fmt: str,
               input_columns: list[str]) -> None:  # fmt: skip
    """The part, atomically: a temporary name, flushed to disk, then renamed."""
    target = os.path.join(directory, name)
    temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    try:
        if fmt == "parquet":
            from sglrun.batch.render import records_table, write_parquet

            write_parquet(*records_table(records, input_columns), temporary)
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        else:
            with open(temporary, "wb") as handle:
                handle.write(b"".join(encode_record(record) for record in records))
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


class BlockWorker:
    """The Ray Data UDF of ``sglrun batch --ray``: one block descriptor in, one summary out."""

    def __init__(
        self,
        setup: Callable[[], WorkerParts],
        options: RunOptions,
        directory: str,
        fingerprint: str,
        part_format: str = "jsonl",
    ) -> None:
        self.parts = setup()
        self.options = options
        self.directory = directory
        self.fingerprint = fingerprint
        self.part_format = part_format

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[bytes]]:
        return {"summary": [orjson.dumps(self.run_block(orjson.loads(b))) for b in batch["block"]]}

    def run_block(self, described: dict[str, Any]) -> dict[str, Any]:
        block = Block.from_dict(described)
        parts, options = self.parts, self.options
        records: list[dict[str, Any]] = []
        warnings: list[str] = []
        cache = parts.cache
        before = _cache_counts(cache)
        started, wall = time.monotonic(), time.time()
        stats = run_batch_file(
            parts.program, open_block(block, options.id_field), backend=parts.backend,
            defaults=parts.defaults, num_threads=parts.concurrency, on_record=records.append,
            include=options.include, mapping=options.mapping, strict=options.strict,
            id_field=options.id_field, source=block.path, grace=0.0,
            on_warning=warnings.append, row_timeout=options.row_timeout,
            input_columns=options.input_columns, json_values=options.json_values, cache=cache,
        )  # fmt: skip
        summary: dict[str, Any] = {"block": block.name, "warnings": warnings}
        if stats.read_error is not None:  # the file broke or changed: no part, the run stops
            summary["error"] = " ".join(str(stats.read_error).split())
            return summary
        name = part_name(block.name, self.fingerprint, self.part_format)
        write_part(self.directory, name, records, self.part_format,
                   list(options.input_columns or ()))  # fmt: skip
        after = _cache_counts(cache)
        summary.update(
            part=name, rows=stats.done, ok=stats.ok, failed=stats.failed, tokens=stats.tokens,
            prompt_tokens=stats.prompt_tokens, row_seconds=stats.row_seconds,
            started=round(wall, 3), seconds=round(time.monotonic() - started, 3),
            pid=os.getpid(),
            cache_hits=after[0] - before[0], cache_misses=after[1] - before[1],
            tokens_saved=after[2] - before[2],
        )  # fmt: skip
        return summary

    def __del__(self) -> None:
        close_parts(getattr(self, "parts", None))


def _cache_counts(cache: CallCache | None) -> tuple[int, int, int]:
    return (cache.hits, cache.misses, cache.tokens_saved) if cache is not None else (0, 0, 0)


def close_parts(parts: WorkerParts | None) -> None:
    """The worker is going: its cache's last answers to disk, its backend shut down."""
    if parts is None:
        return
    try:
        if parts.cache is not None:
            parts.cache.finish()
        parts.backend.shutdown()
    except Exception:
        pass
