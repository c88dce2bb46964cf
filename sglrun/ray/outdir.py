"""The output directory of a scaled-out run: part files and the manifest that counts them.

Why a manifest of our own: Ray's writers name files at random, so a rerun adds files beside
the old ones. Here the manifest (``sglrun-manifest.json``, replaced atomically) holds the plan
(every block, by name) and the parts written, with their counts. Only a part the manifest
lists, or one named for a planned block with this run's fingerprint (written whole by its
rename, the driver killed before it was listed), counts; ``--resume`` runs the other blocks.
A lock (as for a local output) keeps a second run out of the directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import orjson

from sglrun.batch.manifest import OutputLock, now, write_json_atomically
from sglrun.errors import InputError
from sglrun.ray.inputs import Block, is_remote
from sglrun.ray.worker import PART_PREFIX, TEMP_SUFFIX, part_name

__all__ = ["KIND", "MANIFEST", "Manifest", "OutputDir"]

MANIFEST = "sglrun-manifest.json"
KIND = "sglrun ray output"
COUNTS = ("rows", "ok", "failed", "tokens", "prompt_tokens")


@dataclass
class Manifest:
    fingerprint: str
    program: dict[str, Any]
    inputs: list[dict[str, Any]]
    part_format: str
    rows_per_block: int
    blocks: list[dict[str, Any]]
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)  # block name -> counts
    status: str = "running"
    started: str = field(default_factory=now)

    def totals(self) -> dict[str, int]:
        return {key: sum(int(p.get(key, 0)) for p in self.parts.values()) for key in COUNTS}

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": KIND, "version": 1, "status": self.status, "started": self.started,
            "updated": now(), **self.totals(), "fingerprint": self.fingerprint,
            "program": self.program, "inputs": self.inputs, "part_format": self.part_format,
            "rows_per_block": self.rows_per_block, "blocks": self.blocks,
            "parts": [{"block": name, **counts} for name, counts in sorted(self.parts.items())],
        }  # fmt: skip

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Manifest:
        return cls(
            fingerprint=value["fingerprint"], program=value["program"], inputs=value["inputs"],
            part_format=value["part_format"], rows_per_block=value["rows_per_block"],
            blocks=value["blocks"], status=value.get("status", "running"),
            started=value.get("started", now()),
            parts={p["block"]: {k: v for k, v in p.items() if k != "block"}
                   for p in value.get("parts", [])},
        )  # fmt: skip


class OutputDir:
    """``-o OUTDIR`` of ``--ray``: checked, locked and read before anything runs."""

    def __init__(self, path: str, *, resume: bool, overwrite: bool) -> None:
        if is_remote(path):
            raise InputError(f"{path}: -o must be a directory on this machine or a shared mount")
        if os.path.exists(path) and not os.path.isdir(path):
            raise InputError(f"{path}: is a file; with --ray, -o names a directory of part files")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{path}: cannot create it ({exc.strerror or exc})") from None
        self.path = path
        self.manifest_path = os.path.join(path, MANIFEST)
        self.lock = OutputLock(os.path.join(path, "parts"))
        try:
            self.previous = self._read()
            self._check(resume, overwrite)
            self._clean_temporaries()
        except BaseException:
            self.lock.release()
            raise

    def _read(self) -> Manifest | None:
        try:
            with open(self.manifest_path, "rb") as handle:
                value = orjson.loads(handle.read())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            raise InputError(f"{self.manifest_path}: unreadable manifest ({exc})") from None
        if not isinstance(value, dict) or value.get("kind") != KIND:
            raise InputError(f"{self.manifest_path}: not the manifest of an sglrun --ray run")
        try:
            return Manifest.from_json(value)
        except (KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{self.manifest_path}: a broken manifest ({exc!r})") from None

    def _entries(self) -> list[str]:
        hidden = (".parts.sglrun-lock", MANIFEST)
        return [n for n in os.listdir(self.path) if n not in hidden and not n.endswith(".tmp")
                and not n.endswith(TEMP_SUFFIX)]  # fmt: skip

    def _check(self, resume: bool, overwrite: bool) -> None:
        entries = self._entries()
        ours = [n for n in entries if n.startswith(PART_PREFIX)]
        if overwrite:
            if self.previous is None and entries:
                raise InputError(
                    f"{self.path}: holds files sglrun did not write (no {MANIFEST}); "
                    "--overwrite replaces only an sglrun output: choose another -o"
                )
            for name in ours:  # the old parts go; anything else in it stays
                os.unlink(os.path.join(self.path, name))
            if self.previous is not None:
                os.unlink(self.manifest_path)
            self.previous = None
        elif resume and self.previous is None and entries:
            raise InputError(
                f"{self.path}: holds files but no {MANIFEST}: nothing of sglrun's to resume; "
                "choose an empty or new -o"
            )
        elif not resume and (self.previous is not None or entries):
            what = "the output of an earlier run" if self.previous else "files"
            raise InputError(
                f"{self.path}: holds {what}; --resume continues it, --overwrite replaces it, "
                "or choose an empty or new -o"
            )

    def _clean_temporaries(self) -> None:
        """Parts a worker was writing when its run died (never counted)."""
        for name in os.listdir(self.path):
            if name.startswith("." + PART_PREFIX) and name.endswith(TEMP_SUFFIX):
                try:
                    os.unlink(os.path.join(self.path, name))
                except OSError:
                    pass

    def adopt(self, manifest: Manifest, blocks: list[Block]) -> int:
        """Parts on disk that are planned blocks with this fingerprint but not yet listed (the
        driver died between the rename and its next save): counted from their records."""
        adopted = 0
        for block in blocks:
            if block.name in manifest.parts:
                continue
            name = part_name(block.name, manifest.fingerprint, manifest.part_format)
            path = os.path.join(self.path, name)
            if os.path.exists(path):
                manifest.parts[block.name] = {"part": name, **_count(path, manifest.part_format)}
                adopted += 1
        return adopted

    def missing_parts(self, manifest: Manifest) -> list[str]:
        """Listed parts whose file is gone (deleted by hand): their blocks run again."""
        gone = [b for b, p in manifest.parts.items()
                if not os.path.exists(os.path.join(self.path, str(p.get("part"))))]  # fmt: skip
        for block in gone:
            del manifest.parts[block]
        return gone

    def save(self, manifest: Manifest) -> None:
        write_json_atomically(self.manifest_path, manifest.as_json())

    def release(self) -> None:
        self.lock.release()


def _count(path: str, fmt: str) -> dict[str, int]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        errors = pq.read_table(path, columns=["error"]).column("error").to_pylist()
        failed = sum(e is not None for e in errors)
        return {"rows": len(errors), "ok": len(errors) - failed, "failed": failed}
    rows = failed = 0
    with open(path, "rb") as handle:
        for raw in handle:
            if raw.strip():
                rows += 1
                failed += orjson.loads(raw).get("error") is not None
    return {"rows": rows, "ok": rows - failed, "failed": failed}
