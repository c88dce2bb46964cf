"""The inputs of a scaled-out run: files, globs and directories, cut into named blocks.

Why blocks of our own rather than Ray's readers: a block is the unit of exactly-once. Each one
has a name that depends only on its file and its place in it (``0001-reviews-00003``), so a
rerun plans the same blocks, a part file named after its block says which rows it holds, and a
resumed run skips the blocks whose part is written. Rows are read by our own readers, so a bad
line is one error record (as in local mode), never a failed block, and ids are the local ones:
``--id-field``, else the file and the line (``data/a.jsonl#17``), whatever the block size.

A JSONL file is cut at line ends every ``rows_per_block`` lines, found by one pass over its
bytes on the driver (it also gives the progress total); a Parquet file by row groups; a CSV,
TSV or gzipped file is one block (a quoted field may hold a line end, and gzip cannot seek).
Paths with a scheme (``s3://``, ``gs://``) are read through ``pyarrow.fs``.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import IO, Any, cast

from sglrun.batch.readers import RowSource, row_digest
from sglrun.errors import InputError

__all__ = ["Block", "InputFile", "expand_inputs", "open_block", "plan_blocks"]

_TEXT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str  # jsonl, csv, tsv or parquet
    size: int
    mtime: float
    compressed: bool = False


@dataclass(frozen=True)
class Block:
    """Rows ``first_line``.. of ``path``: bytes ``start:end`` of a JSONL file (``end`` -1: to
    the end), row groups ``start:end`` of a Parquet file."""

    name: str
    path: str
    format: str
    start: int
    end: int
    first_line: int
    rows: int | None  # lines planned (the progress total), None when unknown

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Block:
        return cls(**value)


def is_remote(path: str) -> bool:
    """A path with a scheme (``s3://``, ``gs://``, ``file://``): read through pyarrow.fs."""
    return "://" in path


def _filesystem(path: str) -> tuple[Any, str]:
    try:
        from pyarrow import fs
    except ImportError:  # pragma: no cover - the ray extra installs pyarrow
        raise InputError(f"{path}: reading it needs pyarrow: pip install 'sglrun[ray]'") from None
    try:
        return fs.FileSystem.from_uri(path)
    except Exception as exc:
        raise InputError(f"{path}: cannot open this filesystem ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _format_of(path: str) -> tuple[str, bool] | None:
    lower = path.lower()
    compressed = lower.endswith(".gz")
    lower = lower.removesuffix(".gz")
    if lower.endswith(".parquet") and not compressed:
        return "parquet", False
    suffix = os.path.splitext(lower)[1]
    return (_TEXT[suffix], compressed) if suffix in _TEXT else None


def _input_file(path: str, size: int, mtime: float) -> InputFile:
    kind = _format_of(path)
    if kind is None:
        raise InputError(
            f"{path}: unknown input format; with --ray, inputs are .jsonl, .csv, .tsv (maybe "
            ".gz) or .parquet files"
        )
    return InputFile(path, kind[0], size, mtime, kind[1])


def _listed(name: str) -> bool:
    """Files a directory contributes: known formats, not hidden (``.x``, ``_SUCCESS``)."""
    base = os.path.basename(name)
    return not base.startswith((".", "_")) and _format_of(base) is not None


def _local(spec: str) -> list[InputFile]:
    if glob.has_magic(spec):
        paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not paths:
            raise InputError(f"{spec}: no input file matches this pattern")
    elif os.path.isdir(spec):
        paths = sorted(
            os.path.join(root, name)
            for root, dirs, names in os.walk(spec)
            for name in names
            if _listed(name) and not any(part.startswith((".", "_")) for part in
                                         os.path.relpath(root, spec).split(os.sep) if part != ".")
        )  # fmt: skip
        if not paths:
            raise InputError(f"{spec}: the directory holds no .jsonl, .csv, .tsv or .parquet file")
    elif os.path.exists(spec):
        paths = [spec]
    else:
        raise InputError(f"{spec}: no such input file")
    found = []
    for path in paths:
        try:
            info = os.stat(path)
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise InputError(f"{path}: cannot open input ({exc.strerror or exc})") from None
        found.append(_input_file(path, info.st_size, info.st_mtime))
    return found


def _remote(spec: str) -> list[InputFile]:
    from pyarrow import fs

    filesystem, inner = _filesystem(spec)
    scheme = spec.split("://", 1)[0]
    try:
        info = filesystem.get_file_info(inner)
        if info.type == fs.FileType.Directory:
            infos = filesystem.get_file_info(fs.FileSelector(inner, recursive=True))
            infos = [i for i in infos if i.type == fs.FileType.File and _listed(i.path)]
        elif info.type == fs.FileType.File:
            infos = [info]
        else:
            raise InputError(f"{spec}: no such input file")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{spec}: cannot list it ({_short(exc)})") from None
    if not infos:
        raise InputError(f"{spec}: the directory holds no .jsonl, .csv, .tsv or .parquet file")
    return [
        _input_file(f"{scheme}://{i.path}", i.size or 0, i.mtime.timestamp() if i.mtime else 0.0)
        for i in sorted(infos, key=lambda i: i.path)
    ]


def expand_inputs(specs: list[str]) -> list[InputFile]:
    """Every input file the specs name, in order, each once; InputError names a bad one."""
    if not specs:
        raise InputError("no INPUT given")
    seen: set[str] = set()
    files = []
    for spec in specs:
        if spec == "-":
            raise InputError("-: stdin cannot be spread over a cluster; give files with --ray")
        for item in _remote(spec) if is_remote(spec) else _local(spec):
            key = item.path if is_remote(item.path) else os.path.realpath(item.path)
            if key not in seen:
                seen.add(key)
                files.append(item)
    return files


def _open(path: str) -> IO[bytes]:
    if is_remote(path):
        filesystem, inner = _filesystem(path)
        try:
            return filesystem.open_input_file(inner)  # type: ignore[no-any-return]
        except Exception as exc:
            raise InputError(f"{path}: cannot open input ({_short(exc)})") from None
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot open input ({exc.strerror or exc})") from None


def _stem(path: str) -> str:
    base = os.path.basename(path.rstrip("/")).lower()
    base = re.sub(r"(\.gz)?$", "", base)
    base = os.path.splitext(base)[0]
    return re.sub(r"[^a-z0-9_-]+", "_", base)[:40] or "input"


_Cut = tuple[int, int, int, "int | None"]  # start, end, first line, rows


def _jsonl_cuts(handle: IO[bytes], rows_per_block: int) -> Iterator[_Cut]:
    """(start byte, end byte, first line, lines) of each block of a JSONL file."""
    start = offset = 0
    first = line = 1  # the number of the line at ``offset``
    tail = b""
    while True:
        chunk = handle.read(_CHUNK)
        if not chunk:
            break
        tail = chunk[-1:]
        position = 0
        while True:
            needed = rows_per_block - (line - first)
            count = chunk.count(b"\n", position)
            if count < needed:
                line += count
                break
            for _ in range(needed):
                position = chunk.index(b"\n", position) + 1
            line += needed
            end = offset + position
            yield start, end, first, line - first
            start, first = end, line
        offset += len(chunk)
    if offset > start:
        yield start, offset, first, line - first + (tail != b"\n")


def plan_blocks(files: list[InputFile], rows_per_block: int) -> list[Block]:
    """The blocks of every file, named by file number, file stem and block number."""
    blocks = []
    for number, item in enumerate(files, start=1):
        prefix = f"{number:04d}-{_stem(item.path)}"
        cuts: list[_Cut]
        if item.format == "parquet":
            cuts = _parquet_cuts(item.path, rows_per_block)
        elif item.format == "jsonl" and not item.compressed:
            with _open(item.path) as handle:
                cuts = list(_jsonl_cuts(handle, rows_per_block))
        else:
            cuts = [(0, -1, 1, _count_rows(item))]
        for index, (start, end, first, rows) in enumerate(cuts):
            name = f"{prefix}-{index:05d}"
            blocks.append(Block(name, item.path, item.format, start, end, first, rows))
    return blocks


def _count_rows(item: InputFile) -> int | None:
    if is_remote(item.path):
        return None
    source = open_block(Block("count", item.path, item.format, 0, -1, 1, None), None)
    try:
        return source.count_rows()
    finally:
        source.close()


def _parquet_cuts(path: str, rows_per_block: int) -> list[_Cut]:
    import pyarrow.parquet as pq

    try:
        with _open(path) as handle:
            metadata = pq.ParquetFile(handle).metadata
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: not a readable Parquet file ({_short(exc)})") from None
    cuts: list[_Cut] = []
    group = first = rows = 0
    for index in range(metadata.num_row_groups):
        rows += metadata.row_group(index).num_rows
        if rows >= rows_per_block or index == metadata.num_row_groups - 1:
            cuts.append((group, index + 1, first + 1, rows))
            group, first, rows = index + 1, first + rows, 0
    return cuts


def open_block(block: Block, id_field: str | None) -> RowSource:
    """The rows of one block, with the ids and error messages of local mode."""
    if block.format == "parquet":
        return RowSource(
            block.path, "jsonl", id_field, (), None, None,
            id_scope=block.path, records=_parquet_records(block),
        )  # fmt: skip
    handle = _open(block.path)
    try:
        if block.end >= 0:
            handle.seek(block.start)
            data = handle.read(block.end - block.start)
            handle.close()
            stream: IO[bytes] = io.BytesIO(data)
        elif block.path.lower().endswith(".gz"):
            if is_remote(block.path):  # closed with the stream: a GzipFile leaves its source
                stream = cast(IO[bytes], _ClosingGzip(handle))
            else:
                handle.close()
                stream = cast(IO[bytes], gzip.open(block.path, "rb"))
        else:
            stream = handle
    except OSError as exc:
        handle.close()
        raise InputError(f"{block.path}: cannot read input ({exc.strerror or exc})") from None
    source = RowSource(
        block.path, block.format, id_field, stream, None, stream,
        start_line=block.first_line, id_scope=block.path,
    )  # fmt: skip
    source.path = None if is_remote(block.path) or block.end >= 0 else block.path
    return source


class _ClosingGzip(gzip.GzipFile):
    def __init__(self, source: IO[bytes]) -> None:
        super().__init__(fileobj=source)
        self._source = source

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._source.close()


def _parquet_records(block: Block) -> Iterator[tuple[int, Any, str]]:
    import pyarrow.parquet as pq

    with _open(block.path) as handle:
        table = pq.ParquetFile(handle).read_row_groups(list(range(block.start, block.end)))
    for offset, data in enumerate(table.to_pylist()):
        yield block.first_line + offset, data, ""


def file_digest(item: InputFile) -> str:
    """What a resume compares to know the file is the one the blocks were planned on."""
    return row_digest([item.path, item.size, item.mtime])
