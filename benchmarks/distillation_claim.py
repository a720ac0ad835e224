"""The SRPKD claim in miniature: does the relation loss help a compressed student? (issue: SRPKD, part 4)

    python -m benchmarks.distillation_claim --kind pix2pix --teacher runs/demo_p2p --workdir runs/kd_claim \
        [--seeds 0,1,2] [--steps 3000] [--student 8] [--out runs/kd_claim/results.json]
    python -m benchmarks.distillation_claim --kind cyclegan --teacher runs/demo_teacher \
        --workdir runs/kd_claim_cyclegan --student 8

On the built-in synthetic scenes at 64 px, with a teacher trained there (the README's demos:
`configs/pix2pix_cityscapes.py:synthetic` -> runs/demo_p2p, layout -> summer photo, ResNet-6blocks ngf 32;
`configs/cyclegan_horse2zebra.py:synthetic` -> runs/demo_teacher, summer <-> winter, ngf 16), the same
student (ngf --student) is trained three ways, with the same steps, data order and seeds:

  scratch   the plain teacher recipe (pix2pix: GAN + L1 to the target; CycleGAN: GAN + cycle + identity),
            fresh discriminator(s)
  kd        + lambda_kd |G_S(x) - G_T(x)|_1, discriminator(s) from the teacher
  kd_sp     + lambda_sp x relation loss at the last residual block (the paper's method)

and scored on all 200 held-out scenes (both directions for CycleGAN): ground-truth L1 (to the true
render), and the FCN-score analogue (pixel accuracy, mean IoU of the built-in scene labeller on the
output). Prints mean +- std over seeds and writes every run's numbers as JSON. Each run is an ordinary
workdir under --workdir; finished runs are reused, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from absl import logging

from configs import (
    cyclegan_horse2zebra,
    distill_cyclegan_horse2zebra,
    distill_pix2pix_cityscapes,
    pix2pix_cityscapes,
)
from ganjax import main
from ganjax.trainers import common

CONDITIONS = ("scratch", "kd", "kd_sp")
# kind -> (teacher config, distillation config, scored metrics)
KINDS = {
    "pix2pix": (pix2pix_cityscapes, distill_pix2pix_cityscapes, ("gt_l1", "pixel_accuracy", "mean_iou")),
    "cyclegan": (
        cyclegan_horse2zebra,
        distill_cyclegan_horse2zebra,
        tuple(f"{d}/{m}" for d in ("AtoB", "BtoA") for m in ("gt_l1", "pixel_accuracy", "mean_iou")),
    ),
}


def make_config(kind: str, condition: str, *, teacher: str, student: int, steps: int, seed: int):
    plain_config, distill_config, _ = KINDS[kind]
    if condition == "scratch":  # the teacher's recipe: no teacher at all, fresh D, no distillation terms
        config = plain_config.get_config("synthetic")
    else:
        config = distill_config.get_config("synthetic")
        config.teacher.checkpoint = os.path.abspath(os.path.expanduser(teacher))
        if condition == "kd":
            config.distill.lambda_sp = 0.0
    config.seed = seed
    config.model.ngf = student
    config.train.num_steps = steps
    config.train.decay_steps = steps // 3
    config.eval.every_steps = steps  # scored once, at the end
    config.eval.num_examples = 200  # every held-out scene
    config.log.sample_every_steps = steps
    config.checkpoint.every_steps = steps
    return config


def final_eval(workdir: str, steps: int) -> dict[str, float] | None:
    """The eval/ scalars logged at the last step, or None when the run has not finished."""
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return None
    logged = common.read_metrics(workdir).get(steps, {})
    scores = {k.removeprefix("eval/"): v for k, v in logged.items() if k.startswith("eval/")}
    return scores or None


def summarize(results: dict[str, list[dict]], metrics) -> str:
    lines = ["| student | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for condition, runs in results.items():
        cells = []
        for metric in metrics:
            values = [run[metric] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} +- {spread:.4f}")
        lines.append(f"| {condition} (n={len(runs)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="pix2pix", choices=tuple(KINDS))
    parser.add_argument("--teacher", default="runs/demo_p2p", help="workdir of the synthetic teacher run")
    parser.add_argument("--workdir", default="runs/kd_claim")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--student", type=int, default=8, help="the student's ngf")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--out", default="", help="JSON results (default: WORKDIR/results.json)")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)

    seeds = [int(s) for s in args.seeds.split(",")]
    conditions = [c for c in args.conditions.split(",") if c]
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise SystemExit(f"--conditions: unknown {sorted(unknown)}; choose from {CONDITIONS}.")
    results, runs = {c: [] for c in conditions}, []
    for seed in seeds:
        for condition in conditions:  # interleaved, so a partial experiment still compares like with like
            workdir = os.path.join(args.workdir, f"{condition}_seed{seed}")
            scores = final_eval(workdir, args.steps)
            if scores is None:
                config = make_config(
                    args.kind,
                    condition,
                    teacher=args.teacher,
                    student=args.student,
                    steps=args.steps,
                    seed=seed,
                )
                start = time.time()
                main.run(config, workdir)
                print(f"{condition} seed {seed}: {time.time() - start:.0f} s", flush=True)
                scores = final_eval(workdir, args.steps)
            record = {"condition": condition, "seed": seed, "workdir": workdir, **scores}
            print(json.dumps(record), flush=True)
            results[condition].append(scores)
            runs.append(record)

    # The teacher on the same 200 scenes (its own run scored fewer): --mode eval of its latest checkpoint.
    teacher_config = common.load_run_config(args.teacher)
    teacher_config.eval.num_examples = 200
    teacher_scores = main.run(teacher_config, args.teacher, mode="eval")
    metrics = KINDS[args.kind][2]
    table = summarize(results, metrics)
    teacher_line = ", ".join(f"{k} {teacher_scores[k]:.4f}" for k in metrics)
    print(f"\nteacher (ngf {teacher_config.model.ngf}): {teacher_line}")
    print(f"student ngf {args.student}, {args.steps} steps, seeds {seeds}:\n{table}")
    out = args.out or os.path.join(args.workdir, "results.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {
                "kind": args.kind,
                "teacher": {"workdir": args.teacher, "ngf": teacher_config.model.ngf, **teacher_scores},
                "student_ngf": args.student,
                "steps": args.steps,
                "seeds": seeds,
                "runs": runs,
                "table": table,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main_cli()
