"""Results files of a pipeline run: JSONL rows keyed by sample id, resuming, shards per process, and merging.

Protocol (``torchrun --nproc-per-node W``; every process reads ``RANK`` / ``WORLD_SIZE``):

- Sample ``i`` of the dataset (in file order) belongs to rank ``i % W``. A sample is *done* when a row with
  its id is in the results file ``out``, in this rank's shard, or in a shard left by an interrupted run with
  another ``W``; done samples are skipped, so re-running the same command resumes.
- With ``W == 1`` rows are appended to ``out`` itself. With ``W > 1`` rank ``r`` appends to its shard
  ``out.shard-r-of-W``; no process writes another's file.
- Rank 0, after its own samples, polls the other shards until each holds a row for every sample of its rank
  that was not done when the run started (it gives up after ``timeout`` seconds without a new row). It then
  merges ``out`` and every shard into ``out`` (one row per id, the newest wins, in dataset order), replaces
  ``out`` atomically and deletes the merged shards. No rank-to-rank communication is needed, and files from
  an earlier run cannot be mistaken for this run's: completion is judged by the rows, not by marker files.

A row is written and flushed as soon as its sample finishes; a partial last line left by a killed process is
dropped when its file is next read or appended to.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def shard_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.shard-{rank}-of-{world}")


def shard_files(out: Path) -> list[Path]:
    """Every shard of ``out`` on disk, any world size, oldest first."""
    return sorted(out.parent.glob(f"{out.name}.shard-*-of-*"), key=lambda p: (p.stat().st_mtime, p.name))


def _world_of(shard: Path) -> int:
    return int(shard.name.rsplit("-of-", 1)[1])


def read_rows(path: Path) -> list[Row]:
    """Rows of a results file; an unfinished last line (a process killed mid-write) is ignored."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows: list[Row] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: a partial write
                continue
            raise ValueError(f"{path}:{number}: not a JSON results row; fix or delete the file") from None
        if not isinstance(row, dict) or "id" not in row:
            raise ValueError(f"{path}:{number}: a results row must be an object with an 'id'")
        rows.append(row)
    return rows


def key_of(row: Row) -> str:
    return str(row["id"])


class ResultStore:
    """The results file ``out`` of one run, seen from one rank of ``world``."""

    def __init__(self, out: str | os.PathLike[str], rank: int = 0, world: int = 1, run: dict[str, Any] | None = None):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world} processes")
        self.out = Path(out)
        self.rank, self.world = rank, world
        self.run = run or {}
        self.own = self.out if world == 1 else shard_path(self.out, rank, world)

    def _earlier_files(self) -> list[Path]:
        """Files finished before this run started: ``out`` and shards of other world sizes."""
        return [self.out] + [s for s in shard_files(self.out) if _world_of(s) != self.world]

    def _check_run(self, rows: Iterable[Row], path: Path) -> None:
        for row in rows:
            if "run" in row and row["run"] != self.run:
                raise ValueError(
                    f"{path} holds results of another setup ({row['run']}) than this run ({self.run}); "
                    f"use another --out, or delete it to start over"
                )

    def done_at_start(self) -> set[str]:
        """Ids with a row in the files no process of this run writes to."""
        keys: set[str] = set()
        for path in self._earlier_files():
            rows = read_rows(path)
            self._check_run(rows, path)
            keys.update(key_of(r) for r in rows)
        return keys

    def done(self) -> set[str]:
        """Ids this rank skips: :meth:`done_at_start` plus the rows already in its own file."""
        own = read_rows(self.own) if self.own != self.out else []
        self._check_run(own, self.own)
        return self.done_at_start() | {key_of(r) for r in own}

    @contextlib.contextmanager
    def writer(self) -> Iterator[Callable[[Row], None]]:
        """``write(row)`` appends one row to this rank's file and flushes it."""
        self.own.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_line(self.own)
        with self.own.open("a", encoding="utf-8") as handle:

            def write(row: Row) -> None:
                handle.write(json.dumps({**row, "run": self.run}) + "\n")
                handle.flush()

            yield write

    def wait_for_others(
        self, expected: dict[int, set[str]], timeout: float = 1800.0, poll: float = 1.0, sleep=time.sleep
    ) -> None:
        """Rank 0: block until shard ``r`` holds every id in ``expected[r]``, for every other rank ``r``.

        Raises TimeoutError after ``timeout`` seconds during which no shard gained a row.
        """
        missing = {r: set(keys) for r, keys in expected.items() if r != self.rank and keys}
        seen = -1
        last_progress = time.monotonic()
        while True:
            count = 0
            for r in list(missing):
                rows = read_rows(shard_path(self.out, r, self.world))
                count += len(rows)
                missing[r] -= {key_of(row) for row in rows}
                if not missing[r]:
                    del missing[r]
            if not missing:
                return
            if count != seen:
                seen, last_progress = count, time.monotonic()
            elif time.monotonic() - last_progress > timeout:
                summary = ", ".join(f"rank {r}: {len(k)} samples" for r, k in sorted(missing.items()))
                raise TimeoutError(
                    f"rank 0 waited {timeout:.0f} s without a new row from the other ranks ({summary} missing); "
                    f"finished rows stay in {self.out.name}.shard-*; re-run the same command to resume"
                )
            sleep(poll)

    def merge(self, order: list[str]) -> list[Row]:
        """Rank 0: fold every shard into ``out`` (newest row per id wins), in ``order``; delete the shards."""
        shards = shard_files(self.out)
        merged: dict[str, Row] = {}
        for path in [self.out, *shards]:
            for row in read_rows(path):
                merged.pop(key_of(row), None)
                merged[key_of(row)] = row
        position = {key: i for i, key in enumerate(order)}
        rows = sorted(merged.values(), key=lambda r: position.get(key_of(r), len(order)))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        with tmp.open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(tmp, self.out)
        for path in shards:
            path.unlink(missing_ok=True)
        return rows


def _drop_partial_line(path: Path) -> None:
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
