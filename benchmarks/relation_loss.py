"""Fused vs dense SRPKD relation loss: forward+backward time, compile time, compiled memory, accuracy.

    python -m benchmarks.relation_loss [--sizes 1024,4096,16384] [--chunk_sizes 128,512] [--out results.json]

For each N (= H * W, square maps where possible) and each method this jits
``value_and_grad(relation_loss)`` (gradient w.r.t. the student, as in distillation with a frozen teacher;
``--grad both`` adds the teacher), reports the compile time separately, then the median (and min) of
``--repeats`` timed runs after ``--warmup`` untimed ones, plus XLA's compiled memory analysis (temp, output,
argument bytes). Dense forms two N x N matrices and their cotangents; it is skipped (with a note) when its
compiled footprint would exceed ``--max_dense_bytes``. The fused method runs row-chunked with
``relation.DEFAULT_CHUNK_SIZE`` rows per chunk; ``--chunk_sizes`` adds rows ``fused@C`` for other chunk sizes
(its temporary memory is O(chunk * D + D^2), independent of N). Accuracy columns compare the float32 loss and
gradient of each method to the fused loss evaluated in float64 (``--no_accuracy`` skips them).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ganjax.losses.relation import DEFAULT_CHUNK_SIZE, RELATION_METHODS, RELATION_NORMS, relation_loss


def _spatial(n):
    side = math.isqrt(n)
    return (side, side) if side * side == n else (n, 1)


def _features(seed, shape):
    # A shared low-rank, positive-mean component plus noise: relation rows are far from orthogonal, as for
    # real generator features (and the regime where a naive expansion of the loss loses precision).
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((*shape[:-1], 8)) + 1.0
    x = latent @ rng.standard_normal((8, shape[-1])) + 0.5 * rng.standard_normal(shape)
    return x


def _close_student(seed, teacher, channels, noise):
    """A student that has nearly learned the teacher's relations: the teacher's top principal directions
    (the features here have rank ~8 plus noise) plus ``noise``-scaled Gaussian noise."""
    b, h, w, c = teacher.shape
    basis = np.linalg.svd(teacher.reshape(-1, c), full_matrices=False)[2][:channels]
    return teacher @ basis.T + noise * np.random.default_rng(seed).standard_normal((b, h, w, channels))


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _fmt_bytes(b):
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def _expanded_loss(teacher, student, normalize="row", eps=1e-12):
    """The paper's expanded identity, for comparison only (not in ganjax): C x C Gram matrices, then
    sum_i ||A~_T[i]||^2 + ||A~_S[i]||^2 - 2 q_Ti^T K q_Si / (n_Ti n_Si). Autodiff; "row" only."""
    hi = jax.lax.Precision.HIGHEST
    qt = teacher.reshape(teacher.shape[0], -1, teacher.shape[-1]).astype(jnp.float32)
    qs = student.reshape(student.shape[0], -1, student.shape[-1]).astype(jnp.float32)
    mt = jnp.einsum("bnc,bnd->bcd", qt, qt, precision=hi)
    ms = jnp.einsum("bnc,bnd->bcd", qs, qs, precision=hi)
    k = jnp.einsum("bnc,bnd->bcd", qt, qs, precision=hi)
    nt2 = jnp.einsum("bnc,bnc->bn", jnp.einsum("bnc,bcd->bnd", qt, mt, precision=hi), qt)
    ns2 = jnp.einsum("bnc,bnc->bn", jnp.einsum("bnc,bcd->bnd", qs, ms, precision=hi), qs)
    cross = jnp.einsum("bnd,bnd->bn", jnp.einsum("bnc,bcd->bnd", qt, k, precision=hi), qs)
    nt = jnp.maximum(jnp.sqrt(jnp.maximum(nt2, eps * eps)), eps)
    ns = jnp.maximum(jnp.sqrt(jnp.maximum(ns2, eps * eps)), eps)
    per_row = nt2 / nt**2 + ns2 / ns**2 - 2 * cross / (nt * ns)
    n = qt.shape[1]
    return jnp.mean(jnp.sum(per_row, axis=-1)) / (n * n)


def _run_one(n, method, args, teacher, student, reference, chunk_size=None):
    argnums = (0, 1) if args.grad == "both" else (1,)
    if method == "expanded":
        loss = functools.partial(_expanded_loss, normalize=args.normalize)
    elif method == "fused":
        chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
        loss = functools.partial(
            relation_loss, normalize=args.normalize, method=method, chunk_size=chunk_size
        )
    else:
        loss = functools.partial(relation_loss, normalize=args.normalize, method=method)
    fn = jax.jit(jax.value_and_grad(loss, argnums=argnums))
    row = {"n": n, "method": method if chunk_size in (None, DEFAULT_CHUNK_SIZE) else f"fused@{chunk_size}"}
    if method == "fused":
        row["chunk_size"] = chunk_size
    t0 = time.perf_counter()
    compiled = fn.lower(teacher, student).compile()
    row["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is not None:
        row["temp_bytes"] = int(mem.temp_size_in_bytes)
        row["output_bytes"] = int(mem.output_size_in_bytes)
        row["argument_bytes"] = int(mem.argument_size_in_bytes)
        row["peak_bytes"] = row["temp_bytes"] + row["output_bytes"] + row["argument_bytes"]
        row["xla_peak_memory_in_bytes"] = int(getattr(mem, "peak_memory_in_bytes", -1))
        footprint = row["peak_bytes"]
    else:  # some backends do not report; two N x N matrices, their cotangents and temporaries
        footprint = 6 * 4 * n * n * args.batch if method == "dense" else 0
    if method == "dense" and footprint > args.max_dense_bytes:
        row["skipped"] = f"compiled footprint {_fmt_bytes(footprint)} > --max_dense_bytes"
        return row
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(teacher, student))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        value, grads = jax.block_until_ready(compiled(teacher, student))
        times.append(time.perf_counter() - t0)
    row["median_s"] = statistics.median(times)
    row["min_s"] = min(times)
    row["times_s"] = times
    row["loss"] = float(value)
    if reference is not None:
        ref_value, ref_grads = reference
        row["loss_rel_err_vs_f64"] = abs(float(value) - ref_value) / abs(ref_value)
        row["grad_rel_err_vs_f64"] = max(_rel(g, r) for g, r in zip(grads, ref_grads, strict=True))
    row["_grads"] = grads
    return row


def _reference(args, teacher, student):
    argnums = (0, 1) if args.grad == "both" else (1,)
    with jax.enable_x64(True):
        fn = jax.jit(
            jax.value_and_grad(
                functools.partial(relation_loss, normalize=args.normalize, method="fused"), argnums=argnums
            )
        )
        value, grads = fn(jnp.asarray(teacher, jnp.float64), jnp.asarray(student, jnp.float64))
        return float(value), [np.asarray(g) for g in grads]


def measure(
    sizes,
    *,
    methods=RELATION_METHODS,
    batch=1,
    teacher_channels=256,
    student_channels=64,
    normalize="row",
    grad="student",
    close=None,
    warmup=1,
    repeats=5,
    max_dense_bytes=8 * 2**30,
    accuracy=True,
    chunk_sizes=(),
) -> list[dict]:
    """Benchmark rows (dicts, one per N and method) as `main` prints them; `main`'s flags as arguments.

    A fused row (method "fused" at the default chunk size, "fused@C" for each other of ``chunk_sizes`` when
    "fused" is among ``methods``) at an N where dense also ran gets "dense_over_fused_time" and
    "dense_over_fused_temp" / "dense_over_fused_peak" (ratios of compiled temp and peak bytes).
    """
    args = argparse.Namespace(
        batch=batch,
        normalize=normalize,
        grad=grad,
        warmup=warmup,
        repeats=repeats,
        max_dense_bytes=max_dense_bytes,
    )
    rows = []
    for n in sizes:
        h, w = _spatial(n)
        teacher = _features(2 * n, (batch, h, w, teacher_channels))
        if close is None:
            student = _features(2 * n + 1, (batch, h, w, student_channels))
        else:
            student = _close_student(2 * n + 1, teacher, student_channels, close)
        teacher, student = teacher.astype(np.float32), student.astype(np.float32)
        reference = _reference(args, teacher, student) if accuracy else None
        tj, sj = jnp.asarray(teacher), jnp.asarray(student)
        by_method = {m: _run_one(n, m, args, tj, sj, reference) for m in methods}
        if "fused" in methods:
            for c in chunk_sizes:
                if c != DEFAULT_CHUNK_SIZE:
                    by_method[f"fused@{c}"] = _run_one(n, "fused", args, tj, sj, reference, chunk_size=c)
        d = by_method.get("dense", {})
        for label, f in by_method.items():
            if not label.startswith("fused"):
                continue
            if "median_s" in f and "median_s" in d:
                f["dense_over_fused_time"] = d["median_s"] / f["median_s"]
                f["loss_rel_diff_vs_dense"] = abs(f["loss"] - d["loss"]) / abs(d["loss"])
                f["grad_rel_diff_vs_dense"] = max(
                    _rel(x, y) for x, y in zip(f["_grads"], d["_grads"], strict=True)
                )
            for key in ("temp", "peak"):
                if f.get(f"{key}_bytes") and d.get(f"{key}_bytes"):
                    f[f"dense_over_fused_{key}"] = d[f"{key}_bytes"] / f[f"{key}_bytes"]
        for row in by_method.values():
            row.pop("_grads", None)
            rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1024,4096,16384", help="comma-separated N = H * W")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--teacher_channels", type=int, default=256)
    parser.add_argument("--student_channels", type=int, default=64)
    parser.add_argument("--normalize", default="row", choices=RELATION_NORMS)
    parser.add_argument(
        "--methods",
        default=",".join(RELATION_METHODS),
        help='comma-separated; "expanded" adds the paper\'s expanded identity (not in ganjax; "row" only)',
    )
    parser.add_argument(
        "--chunk_sizes",
        default="",
        help=f"comma-separated extra chunk sizes of the fused method (its default, {DEFAULT_CHUNK_SIZE}, "
        "always runs)",
    )
    parser.add_argument("--grad", default="student", choices=("student", "both"))
    parser.add_argument(
        "--close",
        type=float,
        default=None,
        metavar="NOISE",
        help="student = teacher's principal components + NOISE * N(0, 1) (a nearly converged student; "
        "small losses, where the expanded identity loses float32 precision); default: independent features",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_dense_bytes", type=float, default=8 * 2**30)
    parser.add_argument("--no_accuracy", action="store_true", help="skip the float64 reference")
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c]
    for m in methods:
        if m not in (*RELATION_METHODS, "expanded") or (m == "expanded" and args.normalize != "row"):
            parser.error(f'unknown method {m!r} ("expanded" needs --normalize row)')
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            # jaxlib's CPU QR calls LAPACK from scipy's OpenBLAS, whose threads spin badly on a busy machine.
            "env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "XLA_FLAGS")},
        },
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.local_devices()[:1]],
        "jax_version": jax.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "rows": [],
    }
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({results['devices'][0]}), {os.cpu_count()} CPUs"
    )
    print(
        f"B={args.batch} C_T={args.teacher_channels} C_S={args.student_channels} normalize={args.normalize} "
        f"grad={args.grad}; median of {args.repeats} after {args.warmup} warm-up; fused chunk size "
        f"{DEFAULT_CHUNK_SIZE} unless fused@C"
    )
    header = (
        f"{'N':>6} {'method':>10} {'compile s':>9} {'median s':>9} {'min s':>8} {'temp':>10} {'peak':>10} "
        f"{'loss err':>8} {'grad err':>8}  {'fused vs dense':>14}"
    )
    print(header)
    print("-" * len(header))
    for row in measure(
        sizes,
        methods=methods,
        batch=args.batch,
        teacher_channels=args.teacher_channels,
        student_channels=args.student_channels,
        normalize=args.normalize,
        grad=args.grad,
        close=args.close,
        warmup=args.warmup,
        repeats=args.repeats,
        max_dense_bytes=args.max_dense_bytes,
        accuracy=not args.no_accuracy,
        chunk_sizes=chunk_sizes,
    ):
        results["rows"].append(row)
        n, method = row["n"], row["method"]
        if "skipped" in row:
            print(f"{n:>6} {method:>10} {row['compile_s']:>9.2f} {'skipped: ' + row['skipped']}")
            continue
        err = (
            f"{row['loss_rel_err_vs_f64']:>8.1e} {row['grad_rel_err_vs_f64']:>8.1e}"
            if "loss_rel_err_vs_f64" in row
            else f"{'-':>8} {'-':>8}"
        )
        cmp = ""
        if "loss_rel_diff_vs_dense" in row:
            cmp = (
                f"  {row['loss_rel_diff_vs_dense']:.1e}/{row['grad_rel_diff_vs_dense']:.1e}"
                f" (dense/fused time {row['dense_over_fused_time']:.3g}"
            )
            for key in ("temp", "peak"):
                if f"dense_over_fused_{key}" in row:
                    cmp += f", {key} {row[f'dense_over_fused_{key}']:.3g}"
            cmp += ")"
        print(
            f"{n:>6} {method:>10} {row['compile_s']:>9.2f} {row['median_s']:>9.4f} {row['min_s']:>8.4f} "
            f"{_fmt_bytes(row.get('temp_bytes')):>10} {_fmt_bytes(row.get('peak_bytes')):>10} {err}{cmp}"
        )
        sys.stdout.flush()
    print(
        "temp/peak: XLA compiled memory analysis (peak = temp + output + arguments); errors: max relative "
        "error of the float32 loss / gradient vs the float64 loss; fused vs dense: value/grad relative "
        "difference, and dense / fused ratios of time, temp and peak bytes."
    )
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = list(os.getloadavg())
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
