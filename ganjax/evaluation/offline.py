"""`--mode eval` for every trainer: evaluate a run's checkpoints in a process of their own.

A trainer's `evaluate(config, workdir)` builds its networks and test data once and hands `run` a function
`evaluate_step(step) -> StepResult`; this module chooses the steps, writes the results and, in watch
mode, waits for new checkpoints. Training never calls it (FID and the other expensive metrics exist only
here, so a training job never pays for them).

  steps     config.eval.step: that checkpoint (-1 = the latest complete one). config.eval.watch = True:
            every complete checkpoint without a result in WORKDIR/eval/ is evaluated in step order,
            looking again every config.eval.poll_seconds, until a step >= config.train.num_steps has a
            result (or no new checkpoint appeared for config.eval.watch_timeout seconds); config.eval.step
            is not used then. Checkpoints that the trainer deletes (checkpoint.keep) before their turn are
            skipped with a log line.
  weights   the variants a trainer evaluates: aging "ema" (the generator the trainer samples from) and
            "raw"; the translation trainers and the age regressor "raw" (they keep no EMA).
  outputs   WORKDIR/eval/<step>.json:
              {"step": int, "trainer": str, "workdir": str, "evaluated_at": ISO time, "seconds": float,
               "metrics": {weights: {name: float | null}},           (null: NaN, e.g. an empty class)
               "per_target": {weights: [{"target_age": float, name: float | null, ...}, ...]},
               "notes": [str]}                                          (what was skipped and why)
            WORKDIR/eval/results.md: a Markdown table with one row per evaluated step (rebuilt from all the
            JSON files after each step), then the per-target-age tables and notes of the latest step.
            WORKDIR/eval/ also gets TensorBoard events and metrics.jsonl with the scalars as
            "<weights>/<name>", apart from the training run's own logs.

Multi-process runs: every process computes, process 0 writes.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from absl import logging

from ganjax import checkpoint
from ganjax.trainers import common, loop

EVAL_DIR = "eval"
RESULTS_MD = "results.md"
_STEP_JSON = re.compile(r"^(\d+)\.json$")

# Tests replace this (monkeypatch) to drive watch mode without waiting.
sleep = time.sleep


@dataclasses.dataclass
class StepResult:
    """What a trainer's `evaluate_step` returns for one checkpoint.

    metrics: weights name ("ema", "raw") -> {metric name: float}; per_target: weights name -> rows (one
    dict per target age, with "target_age"); notes: what was skipped and why (also logged).
    """

    metrics: dict[str, dict[str, float]]
    per_target: dict[str, list[dict[str, float]]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Settings:
    """config.eval's --mode eval keys; runs saved before these keys existed get the defaults."""

    step: int = -1
    watch: bool = False
    poll_seconds: float = 60.0
    watch_timeout: float = 6 * 3600.0

    @classmethod
    def from_config(cls, config) -> Settings:
        e = config.eval
        return cls(
            step=int(e.get("step", -1)),
            watch=bool(e.get("watch", False)),
            poll_seconds=float(e.get("poll_seconds", 60.0)),
            watch_timeout=float(e.get("watch_timeout", 6 * 3600.0)),
        )


# ---- Checkpoints ----------------------------------------------------------------------------------


def checkpoint_steps(workdir: str) -> list[int]:
    """Complete checkpoint steps of a workdir, ascending (`checkpoint.incomplete_reason`: a step folder
    that orbax is still writing, or that a crash left half-written, is not listed)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(d)
        for d in os.listdir(directory)
        if d.isdigit() and checkpoint.incomplete_reason(os.path.join(directory, d)) is None
    )


def restore_step(config, workdir: str, abstract_state, step: int):
    """The train state of checkpoint `step`, restored into `abstract_state` (ShapeDtypeStructs with
    shardings, see `loop.abstract_state`); raises CheckpointShapeError for another model's checkpoint."""
    ckpt = loop.open_checkpointer(config, workdir)
    try:
        state, _ = ckpt.restore(step, abstract_state)
    finally:
        ckpt.close()
    return state


def _step_to_evaluate(workdir: str, wanted: int) -> int:
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(
            f"No checkpoint in {os.path.join(workdir, 'checkpoints')}: train first (--mode=train)."
        )
    if wanted < 0:
        return steps[-1]
    if wanted not in steps:
        raise FileNotFoundError(
            f"config.eval.step = {wanted}: {workdir} has checkpoints at steps {steps} only."
        )
    return wanted


# ---- Results on disk ---------------------------------------------------------------------------------


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


def _clean(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    return {k: _finite_or_none(v) for k, v in metrics.items()}


def result_record(config, workdir: str, step: int, result: StepResult, seconds: float) -> dict:
    """The JSON object written to eval/<step>.json (see the module docstring)."""
    return {
        "step": int(step),
        "trainer": str(config.trainer),
        "workdir": workdir,
        "evaluated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
        "metrics": {w: _clean(m) for w, m in result.metrics.items()},
        "per_target": {w: [_clean(row) for row in rows] for w, rows in result.per_target.items()},
        "notes": list(result.notes),
    }


def read_results(eval_dir: str) -> list[dict]:
    """All eval/<step>.json records of a workdir's eval folder, by step."""
    if not os.path.isdir(eval_dir):
        return []
    records = []
    for name in os.listdir(eval_dir):
        if _STEP_JSON.match(name):
            with open(os.path.join(eval_dir, name)) as f:
                records.append(json.load(f))
    return sorted(records, key=lambda r: r["step"])


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_format(v) for v in row) + " |" for row in rows]
    return lines


def _ordered_union(lists: Sequence[Sequence[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for items in lists:
        seen.update(dict.fromkeys(items))
    return list(seen)


def results_markdown(records: Sequence[dict]) -> str:
    """results.md: one row per step (columns "<weights> <metric>"), then the latest step's per-target
    tables and notes."""
    if not records:
        return "# Evaluation\n\nNo evaluated checkpoint yet.\n"
    latest = records[-1]
    weights = _ordered_union([list(r["metrics"]) for r in records])
    columns = [
        (w, name)
        for w in weights
        for name in _ordered_union([list(r["metrics"].get(w, {})) for r in records])
    ]
    lines = [f"# Evaluation of {latest['workdir']} ({latest['trainer']})", ""]
    header = ["step"] + [f"{w} {name}" for w, name in columns]
    rows = [[r["step"]] + [r["metrics"].get(w, {}).get(name) for w, name in columns] for r in records]
    lines += _table(header, rows)
    for w, target_rows in latest.get("per_target", {}).items():
        if not target_rows:
            continue
        names = _ordered_union([list(row) for row in target_rows])
        lines += ["", f"## Per target age, {w} weights, step {latest['step']}", ""]
        lines += _table(names, [[row.get(n) for n in names] for row in target_rows])
    if latest.get("notes"):
        lines += ["", f"## Notes (step {latest['step']})", ""] + [f"- {note}" for note in latest["notes"]]
    return "\n".join(lines) + "\n"


def _write_text(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # readers never see a half-written file


def write_result(eval_dir: str, record: dict) -> str:
    """Writes eval/<step>.json and rebuilds eval/results.md; returns the JSON path."""
    os.makedirs(eval_dir, exist_ok=True)
    path = os.path.join(eval_dir, f"{record['step']}.json")
    _write_text(path, json.dumps(record, indent=2) + "\n")
    _write_text(os.path.join(eval_dir, RESULTS_MD), results_markdown(read_results(eval_dir)))
    return path


# ---- The driver -----------------------------------------------------------------------------------


def run(
    config,
    workdir: str,
    evaluate_step: Callable[[int], StepResult],
    primary: str,
) -> dict[str, float]:
    """Evaluates the steps that config.eval names (see the module docstring) and writes their results.

    Returns the `primary` weights' metrics (NaN where the JSON has null) of the evaluated step, in watch
    mode of the highest step with a result: the names of the trainer's in-loop eval/* metrics.
    """
    settings = Settings.from_config(config)
    eval_dir = os.path.join(workdir, EVAL_DIR)
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(eval_dir, exist_ok=True)
    writer = common.create_writer(eval_dir)
    latest: dict | None = None

    def evaluate(step: int) -> dict:
        start = time.perf_counter()
        logging.info("Evaluating %s at step %d.", workdir, step)
        result = evaluate_step(step)
        for note in result.notes:
            logging.info("eval step %d: %s", step, note)
        record = result_record(config, workdir, step, result, time.perf_counter() - start)
        scalars = {f"{w}/{k}": v for w, m in result.metrics.items() for k, v in m.items()}
        if scalars:
            writer.write_scalars(step, scalars)
            writer.flush()
        if is_main:
            path = write_result(eval_dir, record)
            logging.info("Wrote %s (%.1f s): %s", path, record["seconds"], record["metrics"])
        return record

    try:
        if not settings.watch:
            latest = evaluate(_step_to_evaluate(workdir, settings.step))
        else:
            latest = _watch(config, workdir, eval_dir, evaluate, settings)
    finally:
        writer.close()
    if latest is None:
        return {}
    return {k: (float("nan") if v is None else v) for k, v in latest["metrics"].get(primary, {}).items()}


def _watch(config, workdir: str, eval_dir: str, evaluate, settings: Settings) -> dict | None:
    """Evaluates new checkpoints until one at or past train.num_steps has a result; returns the record of
    the highest step with a result."""
    num_steps = int(config.train.num_steps)
    idle_since = time.monotonic()
    records: dict[int, dict] = {}  # kept in memory too: only process 0 writes the files
    while True:
        records.update({r["step"]: r for r in read_results(eval_dir)})
        for step in [s for s in checkpoint_steps(workdir) if s not in records]:
            try:
                records[step] = evaluate(step)
            except Exception:
                if step in checkpoint_steps(workdir):
                    raise
                logging.warning("Checkpoint %d was deleted before it could be evaluated; skipped.", step)
            idle_since = time.monotonic()
        if records and max(records) >= num_steps:
            logging.info(
                "Watch: step %d >= train.num_steps = %d is evaluated; done.", max(records), num_steps
            )
            return records[max(records)]
        if time.monotonic() - idle_since > settings.watch_timeout:
            logging.warning(
                "Watch: no new checkpoint in %s for %.0f s (config.eval.watch_timeout); stopping before "
                "train.num_steps = %d.",
                workdir,
                settings.watch_timeout,
                num_steps,
            )
            return records[max(records)] if records else None
        sleep(settings.poll_seconds)
