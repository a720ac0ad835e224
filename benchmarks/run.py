"""The benchmark suite: ganjax's train steps side by side with PyTorch, the relation loss, FLOP/s, input.

    python -m benchmarks.run --suite default|tiny|gpu [--out results.json] [--profile DIR] [--dump_hlo DIR]
        [--only steps,relation,flops,pipeline] [--steps REGEX] [--repeats N] [--warmup N] [--torch_threads N]

Sections (each a table on stdout and a list in the JSON written to --out):

  steps     one train step of ganjax (jitted, state donated) and of the PyTorch reference of the same
            networks with the same weights on the same batch (benchmarks/train_steps.py), interleaved in
            one process: median (and min) of --repeats timed steps after --warmup untimed ones; compile
            time (lower + compile) reported separately. pix2pix G+D steps (ResNet teacher and students,
            U-Nets; the conditional PatchGAN with ndf 64), the SRPKD distillation step (teacher forward +
            student step + KD losses; PyTorch: no_grad teacher + literal dense relation loss) and the aging
            step (ganjax only: there is no PyTorch aging model). Achieved FLOP/s use the model FLOPs:
            2 x the convolution MACs of ganjax.models.costs x the passes a step runs (G: 3, D: 6, a frozen
            teacher: 1), the same work for both frameworks (costs counts a transposed conv at every output
            pixel, 4x its multiplies, so the U-Nets' are overstated); XLA's own count of the compiled step
            (cost_analysis "flops", which includes what the rewrites add or drop) is in the JSON.
  relation  the fused vs dense SRPKD relation loss, forward + backward w.r.t. the student
            (benchmarks/relation_loss.py): time, XLA's compiled temp and peak bytes, their dense / fused
            ratios.
  flops     an n x n float32 matmul in jax and PyTorch: the device's practical peak, for scale.
  pipeline  the paired grain pipeline's examples/s at the suite's crop size (benchmarks/input_pipeline.py)
            next to the fastest pix2pix step's consumption.

Suites: "default" (the CPU comparison at 256 px, batch 1), "tiny" (shapes only: tiny networks, one repeat;
for tests), "gpu" (batch 8, float32 and bfloat16 rows, larger relation sizes; PyTorch only when it has
CUDA). PyTorch runs with torch.set_num_threads(--torch_threads, default: all cores); XLA with its
defaults. OPENBLAS_NUM_THREADS defaults to 1 here: jaxlib's CPU QR (the fused relation loss) calls LAPACK
from scipy's OpenBLAS, whose threads spin badly on a loaded machine.

--profile DIR writes an XLA profile of two steps of each ganjax step (DIR/<row>/plugins/profile/...;
`tensorboard --logdir DIR`, Profile tab); --dump_hlo DIR writes each step's StableHLO and optimized HLO.
Loaded machines give noisy timings: the JSON records the load average at start and end of each section.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy/scipy load OpenBLAS (see above)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

SECTIONS = ("steps", "relation", "flops", "pipeline")


@dataclasses.dataclass(frozen=True)
class Suite:
    """What a suite runs; sizes in pixels, batch sizes in images."""

    pix2pix: tuple[tuple[str, int, int], ...]  # (generator arch, ngf, image size)
    distill: tuple[tuple[str, int, int, int], ...]  # (arch, teacher ngf, student ngf, image size)
    aging: tuple[tuple[str, int, int], ...]  # (configs/aging_utkface.py variant, image size, batch)
    batch: int  # translation steps
    ndf: int  # the PatchGAN's width
    dtypes: tuple[str, ...]  # compute dtypes of the translation steps
    relation_sizes: tuple[int, ...]  # N = H * W
    relation_channels: tuple[int, int]  # (C_T, C_S)
    relation_accuracy: bool  # float64 reference errors in the relation rows
    matmul: int
    pipeline: dict  # crop_size, load_size, num_images, batch_size, batches, workers
    warmup: int
    repeats: int
    torch_on_gpu_only: bool = False  # gpu suite: PyTorch rows only when torch has CUDA


SUITES = {
    "default": Suite(
        pix2pix=(
            ("resnet_9blocks", 64, 256),
            ("resnet_9blocks", 32, 256),
            ("resnet_9blocks", 16, 256),
            ("unet_256", 64, 256),
            ("unet_256", 16, 256),
        ),
        distill=(("resnet_9blocks", 64, 16, 256),),
        aging=(("", 128, 8),),
        batch=1,
        ndf=64,
        dtypes=("float32",),
        relation_sizes=(1024, 4096, 16384),
        relation_channels=(256, 64),
        relation_accuracy=True,
        matmul=2048,
        pipeline=dict(crop_size=256, load_size=286, num_images=8, batch_size=1, batches=40, workers=(0, 2)),
        warmup=2,
        repeats=5,
    ),
    "tiny": Suite(
        pix2pix=(("resnet_6blocks", 4, 32),),
        distill=(("resnet_6blocks", 8, 4, 32),),
        aging=(("smoke", 32, 2),),
        batch=1,
        ndf=4,
        dtypes=("float32",),
        relation_sizes=(64,),
        relation_channels=(16, 8),
        relation_accuracy=False,
        matmul=128,
        pipeline=dict(crop_size=32, load_size=36, num_images=2, batch_size=2, batches=2, workers=(0,)),
        warmup=1,
        repeats=1,
    ),
    "gpu": Suite(
        pix2pix=(
            ("resnet_9blocks", 64, 256),
            ("resnet_9blocks", 16, 256),
            ("unet_256", 64, 256),
            ("unet_256", 16, 256),
        ),
        distill=(("resnet_9blocks", 64, 16, 256),),
        aging=(("", 128, 32),),
        batch=8,
        ndf=64,
        dtypes=("float32", "bfloat16"),
        relation_sizes=(1024, 4096, 16384, 65536),
        relation_channels=(256, 64),
        relation_accuracy=True,
        matmul=8192,
        pipeline=dict(crop_size=256, load_size=286, num_images=8, batch_size=8, batches=10, workers=(0, 2)),
        warmup=3,
        repeats=10,
        torch_on_gpu_only=True,
    ),
}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def _fmt(x, spec=".3f", missing="-"):
    return missing if x is None else format(x, spec)


def _mib(b):
    return None if b is None else b / 2**20


# ---- Train steps ---------------------------------------------------------------------------------


def _step_cases(suite: Suite, *, with_torch: bool, torch_device: str):
    """(name, builder) pairs; builders run lazily so that one case's memory is freed before the next."""
    from benchmarks import train_steps as ts

    kw = dict(batch=suite.batch, ndf=suite.ndf, with_torch=with_torch, torch_device=torch_device)
    for dtype in suite.dtypes:
        suffix = "" if dtype == "float32" else f" {dtype}"
        for arch, ngf, size in suite.pix2pix:
            yield (
                f"pix2pix {arch} ngf{ngf}{suffix}",
                lambda a=arch, n=ngf, s=size, d=dtype: ts.pix2pix_case(a, n, size=s, dtype=d, **kw),
            )
        for arch, t_ngf, s_ngf, size in suite.distill:
            yield (
                f"distill {arch} {t_ngf}->{s_ngf}{suffix}",
                lambda a=arch, t=t_ngf, n=s_ngf, s=size, d=dtype: ts.distill_case(
                    a, t, n, size=s, dtype=d, **kw
                ),
            )
        for variant, size, batch in suite.aging:
            yield (
                f"aging {variant or 'paper'} {size}px{suffix}",
                lambda v=variant, s=size, b=batch, d=dtype: ts.aging_case(
                    size=s, batch=b, dtype=d, variant=v
                ),
            )


def _profile(case, directory: str) -> str:
    import jax

    path = os.path.join(directory, _slug(case.name))
    with jax.profiler.trace(path):
        for _ in range(2):
            with jax.profiler.TraceAnnotation(case.name):
                case.jax.run()
    return path


def _dump_hlo(case, directory: str) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, _slug(case.name))
    paths = []
    for suffix, text in (
        (".stablehlo.mlir", case.jax.lowered.as_text()),
        (".hlo.txt", case.jax.compiled.as_text()),
    ):
        with open(base + suffix, "w") as f:
            f.write(text)
        paths.append(base + suffix)
    return paths


def run_steps(suite: Suite, args, *, with_torch: bool, torch_device: str, notes: list[str]) -> list[dict]:
    from benchmarks import harness

    print("\n== Train steps: ganjax vs PyTorch, same networks, weights and batch (seconds per step)")
    header = (
        f"{'step':<38} {'jax s':>8} {'torch s':>8} {'jax/torch':>9} {'jax cpu s':>9} {'torch cpu':>9} "
        f"{'compile s':>9} {'GFLOP':>8} {'jax GF/s':>8} {'torch GF/s':>10}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for name, build in _step_cases(suite, with_torch=with_torch, torch_device=torch_device):
        if args.steps and not re.search(args.steps, name):
            continue
        case = build()
        fns = {"jax": case.jax.run}
        if case.torch is not None:
            fns["torch"] = case.torch.run
        times = harness.interleaved(
            fns, warmup=args.warmup or suite.warmup, repeats=args.repeats or suite.repeats
        )
        row = {
            "name": case.name,
            "kind": case.kind,
            "settings": case.settings,
            "notes": case.notes,
            "images_per_step": case.images_per_step,
            "model_flops": case.model_flops,
            "jax": {
                **times["jax"],
                "compile_s": case.jax.compile_s,
                "xla_flops": case.jax.xla_flops,
                "memory": case.jax.memory,
            },
            "torch": times.get("torch"),
        }
        j = row["jax"]["median_s"]
        t = row["torch"]["median_s"] if row["torch"] else None
        if t:
            row["jax_over_torch"] = j / t
            row["jax_over_torch_min"] = row["jax"]["min_s"] / row["torch"]["min_s"]
        flops = case.model_flops
        row["jax_model_gflops_per_s"] = flops / j / 1e9 if flops else None
        row["torch_model_gflops_per_s"] = flops / t / 1e9 if flops and t else None
        row["jax_xla_gflops_per_s"] = case.jax.xla_flops / j / 1e9 if case.jax.xla_flops else None
        row["jax_examples_per_s"] = case.images_per_step / j
        if args.profile:
            row["profile"] = _profile(case, args.profile)
        if args.dump_hlo:
            row["hlo"] = _dump_hlo(case, args.dump_hlo)
        rows.append(row)
        print(
            f"{case.name:<38} {j:>8.3f} {_fmt(t):>8} {_fmt(row.get('jax_over_torch'), '.2f'):>9} "
            f"{row['jax']['cpu_median_s']:>9.3f} {_fmt(row['torch'] and row['torch']['cpu_median_s']):>9} "
            f"{case.jax.compile_s:>9.1f} {_fmt(flops and flops / 1e9, '.1f'):>8} "
            f"{_fmt(row['jax_model_gflops_per_s'], '.1f'):>8} "
            f"{_fmt(row['torch_model_gflops_per_s'], '.1f'):>10}"
        )
        sys.stdout.flush()
        del case
    print(
        "jax/torch: ratio of the medians; cpu s: process CPU time per step (all threads); GFLOP: model FLOPs "
        "of one step (2 x conv MACs x passes); GF/s: those over the median time."
    )
    if any(r["kind"] == "aging" for r in rows):
        notes.append("aging: no PyTorch reference of the aging model exists; ganjax only, no model FLOPs.")
    return rows


# ---- Relation loss, FLOP/s, input pipeline ------------------------------------------------------


def run_relation(suite: Suite, args) -> list[dict]:
    from benchmarks import relation_loss

    ct, cs = suite.relation_channels
    print(f"\n== Relation loss, fused vs dense: forward + backward w.r.t. the student, C_T={ct}, C_S={cs}")
    header = (
        f"{'N':>6} {'method':>7} {'median s':>9} {'compile s':>9} {'temp MiB':>9} {'peak MiB':>9} "
        f"{'dense/fused time':>16} {'temp':>6} {'peak':>6}"
    )
    print(header)
    print("-" * len(header))
    rows = relation_loss.measure(
        suite.relation_sizes,
        teacher_channels=ct,
        student_channels=cs,
        warmup=1,
        repeats=args.repeats or suite.repeats,
        accuracy=suite.relation_accuracy,
    )
    for row in rows:
        if "skipped" in row:
            print(f"{row['n']:>6} {row['method']:>7} skipped: {row['skipped']}")
            continue
        print(
            f"{row['n']:>6} {row['method']:>7} {row['median_s']:>9.4f} {row['compile_s']:>9.2f} "
            f"{_fmt(_mib(row.get('temp_bytes')), '.2f'):>9} {_fmt(_mib(row.get('peak_bytes')), '.2f'):>9} "
            f"{_fmt(row.get('dense_over_fused_time'), '.1f'):>16} "
            f"{_fmt(row.get('dense_over_fused_temp'), '.1f'):>6} "
            f"{_fmt(row.get('dense_over_fused_peak'), '.1f'):>6}"
        )
    print("temp: XLA's compiled temporary buffers; peak: temp + outputs + arguments (memory_analysis()).")
    return rows


def run_flops(suite: Suite, args, torch_module) -> dict:
    from benchmarks import harness

    print(f"\n== Peak: {suite.matmul} x {suite.matmul} float32 matmul")
    result = harness.matmul_flops(
        suite.matmul, repeats=max(3, args.repeats or suite.repeats), torch_module=torch_module
    )
    line = f"jax {result['jax_gflops']:.1f} GFLOP/s (best {result['jax_best_gflops']:.1f})"
    if "torch_gflops" in result:
        line += f"; torch {result['torch_gflops']:.1f} GFLOP/s (best {result['torch_best_gflops']:.1f})"
    print(line)
    return result


def run_pipeline(suite: Suite, step_rows: list[dict], data_dir: str | None) -> dict:
    from benchmarks import input_pipeline

    p = suite.pipeline
    print(
        f"\n== Input pipeline: paired synthetic scenes, {p['load_size']} px stored, {p['crop_size']} px crops"
    )
    owned = data_dir is None
    data_dir = data_dir or tempfile.mkdtemp(prefix="ganjax_bench_data_")
    try:
        build_s = input_pipeline.prepare(
            data_dir, crop_size=p["crop_size"], load_size=p["load_size"], num_images=p["num_images"]
        )
        rows = [
            input_pipeline.measure(
                data_dir,
                crop_size=p["crop_size"],
                load_size=p["load_size"],
                num_images=p["num_images"],
                batch_size=p["batch_size"],
                batches=p["batches"],
                num_workers=w,
            )
            for w in p["workers"]
        ]
    finally:
        if owned:
            shutil.rmtree(data_dir, ignore_errors=True)
    translation = [r for r in step_rows if r["kind"] in ("pix2pix", "distill")]
    fastest = max(translation, key=lambda r: r["jax_examples_per_s"], default=None)
    consumed = fastest["jax_examples_per_s"] if fastest else None
    for row in rows:
        row["over_fastest_step"] = (
            row["examples_per_s"] / consumed if consumed and row["examples_per_s"] else None
        )
        print(
            f"workers {row['num_workers']}: {_fmt(row['examples_per_s'], '.1f')} examples/s "
            f"(startup {row['startup_s']:.2f} s)"
            + (f"; {row['over_fastest_step']:.1f}x what the fastest step consumes" if consumed else "")
        )
    if fastest:
        print(f"fastest ganjax step: {fastest['name']} at {consumed:.2f} examples/s")
    return {
        "build_s": build_s,
        "rows": rows,
        "fastest_step": fastest and fastest["name"],
        "fastest_step_examples_per_s": consumed,
    }


# ---- Targets -------------------------------------------------------------------------------------


def targets(results: dict) -> dict:
    """The tracker's targets, evaluated on this run (issue 7): ratios, not pass/fail on other machines."""
    out = {}
    for row in results.get("steps", []):
        s = row["settings"]
        if row["kind"] == "pix2pix" and s.get("arch") == "resnet_9blocks" and s.get("ngf") in (64, 16):
            if "jax_over_torch" in row and s.get("dtype") == "float32":
                out[f"resnet_ngf{s['ngf']}_jax_over_torch"] = {
                    "value": row["jax_over_torch"],
                    "target": "<= 1.0",
                    "met": row["jax_over_torch"] <= 1.0,
                }
    rel = {(r["n"], r["method"]): r for r in results.get("relation", [])}
    fused = rel.get((4096, "fused"))
    if fused and "dense_over_fused_time" in fused:
        out["relation_4096_dense_over_fused_time"] = {
            "value": fused["dense_over_fused_time"],
            "target": ">= 8",
            "met": fused["dense_over_fused_time"] >= 8,
        }
        for key in ("temp", "peak"):
            value = fused.get(f"dense_over_fused_{key}")
            if value:
                out[f"relation_4096_dense_over_fused_{key}_bytes"] = {
                    "value": value,
                    "target": ">= 50",
                    "met": value >= 50,
                }
    big = rel.get((16384, "fused"))
    if big:
        out["relation_16384_fused_runs"] = {"value": big.get("median_s"), "met": "median_s" in big}
    return out


# ---- Main ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", default="default", choices=tuple(SUITES))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--repeats", type=int, default=0, help="timed repetitions (0: the suite's)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed calls before timing (0: the suite's)")
    parser.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads (0: all cores)")
    parser.add_argument("--no_torch", action="store_true", help="ganjax rows only")
    parser.add_argument("--steps", default="", metavar="REGEX", help="only the step rows whose name matches")
    parser.add_argument("--profile", default=None, metavar="DIR", help="XLA profile of each ganjax step")
    parser.add_argument("--dump_hlo", default=None, metavar="DIR", help="StableHLO + optimized HLO per step")
    parser.add_argument(
        "--data_dir", default=None, help="pipeline: TFDS data_dir to build into (default: tmp)"
    )
    args = parser.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    for s in sections:
        if s not in SECTIONS:
            parser.error(f"unknown section {s!r}; choose from {SECTIONS}")
    args.sections = sections
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    suite = SUITES[args.suite]

    from ganjax import host_allocator

    host_malloc = "keep" if host_allocator.configure() else "system"  # as ganjax.main runs; before jax starts

    import jax

    from benchmarks import harness

    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
    torch_device = "cpu"
    with_torch = torch is not None
    notes = []
    if torch is not None:
        torch.set_num_threads(args.torch_threads or os.cpu_count())
        if suite.torch_on_gpu_only:
            if torch.cuda.is_available():
                torch_device = "cuda"
            else:
                with_torch = False
                notes.append(
                    "gpu suite: this torch has no CUDA, so no PyTorch rows (a CPU time is no reference)."
                )
    elif not args.no_torch:
        notes.append("torch is not installed: ganjax rows only (pip install -e '.[test]').")

    machine = harness.machine_info()
    results = {
        "suite": args.suite,
        "machine": machine,
        "backend": machine["backend"],
        "device_kind": machine["device_kind"],
        "versions": machine["versions"],
        "settings": {
            "suite": dataclasses.asdict(suite),
            "sections": args.sections,
            "repeats": args.repeats or suite.repeats,
            "warmup": args.warmup or suite.warmup,
            "torch_threads": torch.get_num_threads() if torch is not None else None,
            "torch_device": torch_device if with_torch else None,
            "xla": "default flags (XLA_FLAGS as in machine.env)",
            # one process for both frameworks, so PyTorch runs under the same malloc settings
            "host_malloc": host_malloc,
            "timing": "median of the timed steps after warm-up; the frameworks interleaved step by step",
        },
        "load_average": {"start": harness.load_average()},
        "notes": notes,
    }
    threads = f"{torch.get_num_threads()} torch threads" if torch is not None else "no torch"
    print(
        f"ganjax benchmarks, suite {args.suite}: jax {jax.__version__} on {machine['backend']} "
        f"({machine['device_kind']}), {machine['cpu_model']}, {machine['cpu_count']} cores, {threads}, "
        f"host malloc {host_malloc}; load average {results['load_average']['start']}"
    )
    t0 = time.perf_counter()
    if "steps" in args.sections:
        results["steps"] = run_steps(
            suite, args, with_torch=with_torch, torch_device=torch_device, notes=notes
        )
        results["load_average"]["after_steps"] = harness.load_average()
    if "relation" in args.sections:
        results["relation"] = run_relation(suite, args)
        results["load_average"]["after_relation"] = harness.load_average()
    if "flops" in args.sections:
        results["flops"] = run_flops(suite, args, torch if with_torch and torch_device == "cpu" else None)
    if "pipeline" in args.sections:
        results["pipeline"] = run_pipeline(suite, results.get("steps", []), args.data_dir)
    results["load_average"]["end"] = harness.load_average()
    results["targets"] = targets(results)
    results["wall_s"] = time.perf_counter() - t0
    if results["targets"]:
        print("\n== Targets (issue 7), on this machine")
        for key, t in results["targets"].items():
            verdict = "met" if t["met"] else "not met"
            print(f"{key}: {_fmt(t['value'], '.3g')} (target {t.get('target', 'runs')}): {verdict}")
    for note in notes:
        print(f"note: {note}")
    print(f"load average: {results['load_average']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
