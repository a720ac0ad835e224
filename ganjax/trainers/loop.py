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

Stopping early (preemption, Ctrl-C): while the loop runs, SIGTERM or SIGINT lets the current step finish,
logs its metrics, saves a checkpoint at that step (skipping eval and samples), closes the writers and the
data workers and returns normally, so `python -m ganjax.main` exits with status 0; the same command
resumes. A second SIGINT interrupts at once (KeyboardInterrupt). In a multi-process job SIGTERM belongs to
JAX's preemption service, which tells every process: all of them stop at the step orbax's
`reached_preemption` names, so they save the same step (SIGINT is turned into such a notice there).

Input: the next batch is read, decoded and put on the devices while the current step runs
(`ganjax.prefetch`), so the loop never waits for the host between steps; no host sync inside the loop
except the periodic actions.

Resuming (`restore_latest`): the latest complete checkpoint; incomplete ones (a save killed half-way, a
step folder without its state) are ignored and each is named in a warning.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
from absl import logging
from clu import periodic_actions

from ganjax import checkpoint, prefetch
from ganjax.trainers import common

# Batches sharded onto the devices ahead of the step that uses them (the one in use + 1 in flight).
PREFETCH_BATCHES = 2

# state -> {name: float} logged as eval/<name> ({} logs nothing)
EvaluateFn = Callable[[Any], Mapping[str, float]]
# (state, step) -> None; writes pictures to the writer and the workdir
SamplesFn = Callable[[Any, int], None]


def open_checkpointer(config, workdir: str) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)


def restore_latest(ckpt: checkpoint.Checkpointer, state, train_iter) -> tuple[Any, bool]:
    """(state, True) restored from the workdir's latest complete checkpoint, data position included, or
    (state, False) unchanged when the workdir has none. Incomplete checkpoints are named in a warning;
    incomplete step folders are renamed `<step>.incomplete` (process 0) so that the step can be saved
    again."""
    for path, reason in ckpt.incomplete():
        note = ""
        if os.path.basename(path).isdigit() and jax.process_index() == 0:
            note = f"; moved to {ckpt.set_aside(path)}"
        logging.warning("Ignoring incomplete checkpoint %s: %s%s.", path, reason, note)
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


class StopSignals:
    """While active (a `with` block in the main thread), SIGTERM and SIGINT ask the loop to stop after the
    current step instead of killing the process; the previous handlers come back on exit.

    One process: both signals set `received`. Several processes: SIGTERM is left to JAX's preemption
    notifier (installed by jax.distributed.initialize), which propagates it to every process, and SIGINT
    is re-sent as SIGTERM to reach it; the loop then stops where `Checkpointer.reached_preemption` says, the
    same step everywhere. A second SIGINT raises KeyboardInterrupt (stop now, no checkpoint).
    """

    def __init__(self):
        self.received: str | None = None  # name of the first signal
        self._previous: dict[int, Any] = {}
        self._local = _single_process()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # handlers can only be installed from the main thread
        if self._local:
            wanted = (signal.SIGTERM, signal.SIGINT)
        elif _jax_preemption_service_running():
            wanted = (signal.SIGINT,)
        else:
            logging.warning(
                "The JAX preemption service is off: SIGTERM/SIGINT end this multi-process run without a "
                "checkpoint (enable jax_enable_preemption_service to save on preemption)."
            )
            wanted = ()
        for signum in wanted:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if signum == signal.SIGINT:
                self.__exit__()
                raise KeyboardInterrupt(f"second {name} while stopping")
            logging.warning("%s received; already stopping after the current step.", name)
            return
        self.received = name
        logging.warning(
            "%s received: finishing the current step, then saving a checkpoint and stopping "
            "(press Ctrl-C again to stop at once, without a checkpoint).",
            name,
        )
        if not self._local:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier tells every process

    def should_stop(self, step: int, ckpt: checkpoint.Checkpointer) -> bool:
        """Whether to stop after `step`; call it at every step (the multi-process sync point needs that)."""
        if self._local:
            return self.received is not None
        return ckpt.reached_preemption(step)


def _single_process() -> bool:
    return jax.process_count() == 1


def _jax_preemption_service_running() -> bool:
    # jax exposes no public query for this; the pinned jax keeps it in distributed.global_state.
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager is not None


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
    periodic actions above, or until a stop signal (see `StopSignals`); closes the checkpointer (waiting
    for the last save), the writer and the data iterator on any exit. Returns the final state (the state
    of the step it stopped at after a signal)."""
    num_steps = config.train.num_steps
    step = int(jax.device_get(state.step))
    report = periodic_actions.ReportProgress(
        num_train_steps=num_steps, writer=writer, every_steps=config.log.every_steps
    )
    history = common.MetricHistory()  # device metrics since the last log, fetched lazily

    # Exit order: wait for the last save, close the writers and the data workers (each even if another
    # fails), then put the previous signal handlers back.
    with StopSignals() as stop, contextlib.ExitStack() as cleanup:
        # The next batches are read and sent to the devices while the current step runs; checkpoints
        # record the position of the first batch not yet consumed (ganjax/prefetch.py).
        batches = prefetch.prefetch_to_device(train_iter, mesh, size=PREFETCH_BATCHES)
        cleanup.callback(batches.close)  # closes train_iter too
        cleanup.callback(writer.close)
        cleanup.callback(ckpt.close)
        while step < num_steps:
            state, metrics = step_fn(state, next(batches))
            step += 1
            history.append(step, metrics)
            report(step)
            last = step == num_steps
            # A stop signal skips eval and samples: the time before a preemption's kill is short.
            stopping = stop.should_stop(step, ckpt) and not last

            if step % config.log.every_steps == 0 or last or stopping:
                writer.write_scalars(step, common.mean_metrics(history.fetch_checked(ckpt)))
                history.clear()
                writer.flush()  # once per log interval, not on every step
            if (step % config.eval.every_steps == 0 or last) and not stopping:
                with report.timed("eval"):
                    eval_metrics = evaluate(state)
                if eval_metrics:
                    writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
            if (step % config.log.sample_every_steps == 0 or last) and not stopping:
                write_samples(state, step)
            if step % config.checkpoint.every_steps == 0 or last or stopping:
                history.fetch_checked(ckpt)
                ckpt.save(step, state, batches.get_state())
            if stopping:
                logging.warning(
                    "Stopped at step %d of %d (%s): checkpoint saved in %s. Run the same command "
                    "to resume from it.",
                    step,
                    num_steps,
                    stop.received or "preemption notice",
                    ckpt.directory,
                )
                break
    return state
