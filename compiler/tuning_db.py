"""The tuning database: one append-only JSON-lines file of measurements, keyed by target and task.

A record is {"target", "task", "name", "knobs", "latency_s" (null when the candidate failed),
"error", "where", "time"}, plus "trace" (a MetaSchedule schedule trace) for MetaSchedule steps. Each append is flushed and fsynced, so a crash or Ctrl-C loses at most
the measurement in flight; a corrupt line (a torn write, a bad merge) is skipped with a warning.
MetaSchedule keeps its own database in DIR/meta_schedule/.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

from targets import TargetSpec
from targets.errors import ShrinkcError

RECORDS = "records.jsonl"
FORMAT = 1


def target_key(spec: TargetSpec) -> str:
    """Records of one target never apply to another: its name plus a digest of its TVM target JSON."""
    digest = hashlib.sha1(json.dumps(spec.tvm, sort_keys=True).encode()).hexdigest()[:10]
    return f"{spec.name}/{digest}"


def knobs_id(knobs: dict) -> str:
    """A canonical text for a knob setting (what `measured` is keyed by)."""
    return json.dumps(knobs, sort_keys=True)


class TuningDB:
    """DIR/records.jsonl: read every valid record, append new ones durably."""

    def __init__(self, path: str, create: bool = False, warn=None):
        self.path = os.path.abspath(path)
        self.file = os.path.join(self.path, RECORDS)
        self.warn = warn or (lambda msg: print(f"shrinkc: warning: {msg}", file=sys.stderr))
        self._warned: set[int] = set()  # corrupt line numbers already warned about (records() is read often)
        if create:
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as err:
                raise ShrinkcError(f"cannot create the tuning database folder '{path}': {err.strerror}",
                                   "pass a writable --db folder") from None
        elif not os.path.isfile(self.file):
            raise ShrinkcError(f"'{path}' holds no tuning database ({RECORDS} is missing)",
                               "pass the --db folder `shrinkc tune` wrote")

    def records(self, target: str | None = None) -> list[dict]:
        """Valid records (of `target` when given), in the order written; corrupt lines warned about."""
        if not os.path.exists(self.file):
            return []
        try:
            with open(self.file, encoding="utf-8", errors="replace") as f:
                lines = f.read().split("\n")
        except OSError as err:
            raise ShrinkcError(f"cannot read the tuning database '{self.file}': {err.strerror}",
                               "check its permissions") from None
        out = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or not {"target", "task", "knobs"} <= rec.keys() \
                        or not isinstance(rec["knobs"], dict):
                    raise ValueError("not a tuning record")
            except ValueError:
                if number not in self._warned:
                    self._warned.add(number)
                    self.warn(f"{self.file} line {number} is corrupt; skipped")
                continue
            if target is None or rec["target"] == target:
                out.append(rec)
        return out

    def append(self, rec: dict) -> None:
        """Write one record and make it durable before returning."""
        rec = {"format": FORMAT, **rec, "time": round(time.time(), 3)}
        line = json.dumps(rec, sort_keys=True) + "\n"
        with open(self.file, "a+b") as f:
            # NOTE: a torn last line (killed mid-write) must not swallow this record
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())

    def measured(self, target: str) -> dict[tuple[str, str], dict]:
        """(task key, knobs id) -> the record, for everything already measured on `target`."""
        return {(r["task"], knobs_id(r["knobs"])): r for r in self.records(target)}

    def best(self, target: str) -> dict[str, dict]:
        """Task key -> the fastest successful record on `target`."""
        best: dict[str, dict] = {}
        for r in self.records(target):
            lat = r.get("latency_s")
            if isinstance(lat, (int, float)) and lat > 0 and (r["task"] not in best or lat < best[r["task"]]["latency_s"]):
                best[r["task"]] = r
        return best


def knobs_from_db(db: str, spec: TargetSpec) -> dict[str, dict]:
    """Task key -> the best knobs measured for this target (what `compile --tuning-db DIR` applies)."""
    database = TuningDB(db)
    best = database.best(target_key(spec))
    if not best and database.records():
        database.warn(f"the tuning database '{db}' has no records for target '{spec.name}' "
                      f"({target_key(spec)}); compiling untuned")
    # a MetaSchedule record's schedule is its trace (schedules/meta_schedule_trace.py replays it)
    return {task: {**r["knobs"], **({"trace": r["trace"]} if r.get("trace") else {})}
            for task, r in best.items() if r["knobs"]}
