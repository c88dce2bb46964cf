"""``--joblog FILE``: one tab-separated line per finished row, as GNU parallel's job log.

Columns: ``id``, ``start`` (Unix time the row started), ``runtime`` (seconds), ``status``
(``ok``, ``failed`` or ``timeout``) and ``attempts`` (how many runs of that id the log holds,
this one included: a ``--retry-errors`` run appends to the same log). Lines are flushed as
rows finish, so ``tail -f`` follows a run and a crash loses at most one line.
"""

from __future__ import annotations

import csv
import os
import threading
from collections import Counter
from typing import IO

from sglrun.errors import InputError

__all__ = ["COLUMNS", "JobLog"]

COLUMNS = ("id", "start", "runtime", "status", "attempts")


class JobLog:
    """Appends to ``path`` (its header written once); counts earlier attempts of each id."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._attempts: Counter[str] = Counter()
        fresh = not os.path.exists(path) or os.path.getsize(path) == 0
        if not fresh:
            self._count_earlier(path)
        try:
            self._file: IO[str] = open(path, "a", encoding="utf-8", newline="")
        except OSError as exc:
            raise InputError(f"{path}: cannot write the job log ({exc.strerror or exc})") from None
        self._writer = csv.writer(self._file, delimiter="\t", lineterminator="\n")
        if fresh:
            self._writer.writerow(COLUMNS)
            self._file.flush()

    def _count_earlier(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8", newline="") as handle:
                reader = csv.reader(handle, delimiter="\t")
                header = next(reader, None)
                if header is None or tuple(header) != COLUMNS:
                    raise InputError(
                        f"{path}: not an sglrun job log (its header is not "
                        f"{' '.join(COLUMNS)}); name another file"
                    )
                for fields in reader:
                    if fields:
                        self._attempts[fields[0]] += 1
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read the job log ({exc})") from None

    def row(self, row_id: str, start: float, runtime: float, status: str) -> None:
        with self._lock:
            self._attempts[row_id] += 1
            self._writer.writerow(
                (row_id, f"{start:.3f}", f"{runtime:.3f}", status, self._attempts[row_id])
            )
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
