"""SRPKD students of a CycleGAN teacher (PAPERS.md §B): horse <-> zebra and the other unpaired sets.

Both directions' students are distilled (bidirectional, the paper's best): G_A and G_B each learn from the
teacher's G_A / G_B through the output L1 (distill.lambda_kd) and the relation matrices of the last
residual block (distill.lambda_sp), on top of the CycleGAN losses; D_A, D_B start from the teacher's.

The argument after the colon: comma-separated `student=32|16` (the students' ngf; the teacher is
ResNet-9blocks ngf 64: 11.38M -> 2.85M / 0.72M parameters), `dataset=horse2zebra|summer2winter_yosemite|
apple2orange|tiger2leopard`, and one variant `synthetic` | `smoke`:
  python -m ganjax.main --config configs/distill_cyclegan_horse2zebra.py:student=16 \
      --config.teacher.checkpoint=runs/h2z_teacher --workdir runs/h2z_s16
  python -m ganjax.main --config configs/distill_cyclegan_horse2zebra.py:dataset=apple2orange,student=32 \
      --config.teacher.checkpoint=runs/a2o_teacher --workdir runs/a2o_s32
The teacher is a finished CycleGAN run on the same data (configs/cyclegan_horse2zebra.py) or PyTorch weights
converted with `python -m ganjax.interop.convert` (G_A and G_B into one folder).
Built-in synthetic scenes (summer <-> winter at 64 px) with the teacher of the README's CycleGAN demo
(trained first: python -m ganjax.main --config configs/cyclegan_horse2zebra.py:synthetic --workdir
runs/demo_teacher):
  python -m ganjax.main --config configs/distill_cyclegan_horse2zebra.py:synthetic --workdir runs/demo_kd
Tests: `:smoke` (tiny networks; the test sets teacher.checkpoint to a smoke teacher it trains).
"""

import ml_collections

from configs import cyclegan_horse2zebra
from ganjax.config_args import parse_config_arg

# Images per epoch of each set (the reference's epoch: max(|trainA|, |trainB|)); 100 + 100 epochs as the
# teacher. tiger2leopard is not in the reference's download script (assemble trainA/testA from ImageNet
# tigers, trainB/testB from leopards): its 1000 is a round guess, set train.num_steps / decay_steps to
# 200 / 100 x max(|trainA|, |trainB|) of your folders.
DATASET_EPOCHS = {
    "horse2zebra": 1334,
    "summer2winter_yosemite": 1231,
    "apple2orange": 1019,
    "tiger2leopard": 1000,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, args = parse_config_arg(
        arg,
        config_name="distill_cyclegan_horse2zebra.py",
        variants=("", "synthetic", "smoke"),
        choices={"student": ("32", "16", "8", "4", "2"), "dataset": tuple(DATASET_EPOCHS)},
    )
    # The teacher run's config: data, networks and losses are the teacher's, then the student narrows G.
    config = cyclegan_horse2zebra.get_config(variant)
    config.trainer = "distill_cyclegan"  # ganjax/trainers/cyclegan.py with a teacher
    if variant == "" and "dataset" in args:
        epoch = DATASET_EPOCHS[args["dataset"]]
        config.data.dataset = args["dataset"]
        config.train.num_steps = 200 * epoch
        config.train.decay_steps = 100 * epoch

    # ---- Teacher: the frozen generators G_A, G_B of a CycleGAN run ------------------------------
    config.teacher = teacher = ml_collections.ConfigDict()
    teacher.checkpoint = ""  # its --workdir (or checkpoints/<step>, or a converted PyTorch folder)
    teacher.ngf = config.model.ngf  # the teacher's width; model.ngf becomes the student's below
    teacher.norm = config.model.norm
    teacher.dropout = config.model.dropout
    teacher.train_mode = False  # teacher outputs in eval mode (running statistics, no dropout)
    teacher.init_discriminator = True  # D_A, D_B start from the teacher run's

    # ---- Distillation losses (added to both directions' generator loss) ----------------------
    config.distill = distill = ml_collections.ConfigDict()
    distill.lambda_kd = 10.0  # |G_S(x) - G_T(x)|_1, the weight of CycleGAN's cycle loss
    # relation_loss is at most 4/N (N positions; the normalised matrices' rows have unit norm), so its
    # weight scales with N: 64x64 positions at 256 px.
    distill.lambda_sp = 10000.0
    distill.relation_layers = ("bottleneck",)  # the last residual block's output (paper's layer)
    distill.relation_norm = "row"  # "row" (the paper: rows of A = Q Q^T) or "cosine" (rows of Q)
    distill.relation_method = "fused"  # "fused" (never forms N x N) or "dense" (the reference)

    # ---- Student: the teacher's architecture at width `student` -------------------------------
    if variant == "":
        config.model.ngf = int(args.get("student", "16"))
    elif variant == "synthetic":
        teacher.checkpoint = "runs/demo_teacher"  # the README's CycleGAN demo (ngf 16)
        config.model.ngf = int(args.get("student", "8"))
        distill.lambda_sp = 625.0  # N = 16x16 at 64 px
        config.log.sample_every_steps = 500
        config.eval.every_steps = 500
    else:  # smoke: a 4-wide teacher, 2-wide students
        config.model.ngf = int(args.get("student", "2"))
        distill.lambda_sp = 156.0  # N = 8x8
    return config
