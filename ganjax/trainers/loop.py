"""The loop every trainer runs: resume, step, periodic log / eval / samples / checkpoint, clean close.

A trainer builds its pieces (a fresh state, the jitted step, the data iterator, its evaluation and
sample-picture callbacks) and hands them to `train_loop`; the resume rule and the order of the periodic
actions live here once. Per step, in this order (each also on the last step):

  log         every config.log.every_steps: mean of the step metrics since the last log (one host sync),
              after a NaN/Inf check that stops the run naming the metric
  eval        every config.eval.every_steps: `evaluate(state)` logged under eval/
  samples     every config.log.sample_every_steps: `write_samples(state, step)`
  checkpoint  every config.checkpoint.every_steps: the metrics are checked first, so a non-finite run
              never overwrites its last good checkpoint
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
from absl import logging
from clu import periodic_actions

from ganjax import checkpoint, sharding
from ganjax.trainers import common

# state -> {name: float} logged as eval/<name> ({} logs nothing)
EvaluateFn = Callable[[Any], Mapping[str, float]]
# (state, step) -> None; writes pictures to the writer and the workdir
SamplesFn = Callable[[Any, int], None]


def open_checkpointer(config, workdir: str) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)


def restore_latest(ckpt: checkpoint.Checkpointer, state, train_iter) -> tuple[Any, bool]:
    """(state, True) restored from the workdir's latest checkpoint, data position included, or
    (state, False) unchanged when the workdir has none."""
    latest = ckpt.latest_step()
    if latest is None:
        return state, False
    state, data_state = ckpt.restore(latest, state)
    if data_state:
        train_iter.set_state(data_state)
    logging.info("Resumed from %s/%d.", ckpt.directory, latest)
    return state, True


def restore_for_eval(config, workdir: str, abstract_state) -> tuple[Any, int]:
    """The latest checkpoint restored into `abstract_state` (ShapeDtypeStructs with shardings), and
    its step; FileNotFoundError when the workdir has none."""
    ckpt = open_checkpointer(config, workdir)
    try:
        latest = ckpt.latest_step()
        if latest is None:
            raise FileNotFoundError(f"No checkpoint in {ckpt.directory}: train first (--mode=train).")
        state, _ = ckpt.restore(latest, abstract_state)
    finally:
        ckpt.close()
    return state, latest


def abstract_state(init: Callable, rng, state_sharding):
    """The state `init(rng)` would build, as ShapeDtypeStructs carrying `state_sharding`."""
    shapes = jax.eval_shape(init, rng)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sharding
    )


def train_loop(
    config,
    *,
    state,
    step_fn: Callable,
    train_iter,
    mesh,
    ckpt: checkpoint.Checkpointer,
    writer,
    evaluate: EvaluateFn,
    write_samples: SamplesFn,
):
    """Runs `step_fn(state, sharded_batch) -> (state, metrics)` up to config.train.num_steps with the
    periodic actions above; closes the checkpointer (waiting for the last save), the writer and the
    data iterator on any exit. Returns the final state."""
    num_steps = config.train.num_steps
    step = int(jax.device_get(state.step))
    report = periodic_actions.ReportProgress(
        num_train_steps=num_steps, writer=writer, every_steps=config.log.every_steps
    )
    history = common.MetricHistory()  # device metrics since the last log, fetched lazily

    try:
        while step < num_steps:
            batch = sharding.shard_batch(next(train_iter), mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            history.append(step, metrics)
            report(step)
            last = step == num_steps

            if step % config.log.every_steps == 0 or last:
                writer.write_scalars(step, common.mean_metrics(history.fetch_checked(ckpt)))
                history.clear()
                writer.flush()  # once per log interval, not on every step
            if step % config.eval.every_steps == 0 or last:
                with report.timed("eval"):
                    eval_metrics = evaluate(state)
                if eval_metrics:
                    writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
            if step % config.log.sample_every_steps == 0 or last:
                write_samples(state, step)
            if step % config.checkpoint.every_steps == 0 or last:
                history.fetch_checked(ckpt)
                ckpt.save(step, state, train_iter.get_state())
    finally:
        ckpt.close()
        writer.close()
        common.close_iterator(train_iter)
    return state
