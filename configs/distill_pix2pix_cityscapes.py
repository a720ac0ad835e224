"""SRPKD student of a pix2pix teacher (PAPERS.md §B): Cityscapes labels -> photo.

The student learns from the frozen teacher through the output L1 (distill.lambda_kd) and the relation
matrices of its encoder features (distill.lambda_sp), on top of pix2pix's GAN + L1 losses; its
discriminator starts from the teacher's.

The argument after the colon: comma-separated `arch=unet|resnet` (U-Net-256, the pix2pix default, or
ResNet-9blocks), `student=32|16` (the student's ngf; the teacher has ngf 64), and one variant `synthetic` |
`smoke`. The three pairs of the paper: arch=resnet,student=32 (11.38M -> 2.85M parameters),
arch=resnet,student=16 (-> 0.72M), arch=unet,student=16 (54.41M -> 3.40M).
  python -m ganjax.main --config configs/distill_pix2pix_cityscapes.py:arch=unet,student=16 \
      --config.teacher.checkpoint=runs/cityscapes_teacher --workdir runs/cityscapes_unet_s16
The teacher is a finished pix2pix run on the same data (configs/pix2pix_cityscapes.py, with
--config.model.generator=resnet_9blocks for arch=resnet) or converted PyTorch weights
(`python -m ganjax.interop.convert`).
Built-in synthetic scenes (layout -> photo at 64 px) with the teacher of the README's pix2pix demo
(trained first: python -m ganjax.main --config configs/pix2pix_cityscapes.py:synthetic --workdir
runs/demo_p2p):
  python -m ganjax.main --config configs/distill_pix2pix_cityscapes.py:synthetic --workdir runs/demo_p2p_kd
Tests: `:smoke` (tiny networks; the test sets teacher.checkpoint to a smoke teacher it trains).
"""

import ml_collections

from configs import pix2pix_cityscapes
from ganjax.config_args import parse_config_arg

ARCHS = {"unet": "unet_256", "resnet": "resnet_9blocks"}
# The relation layer: the ResNet's last residual block (the paper's, 64x64 at 256 px); the U-Net's
# innermost level is 1x1 at 256 px (one position: a constant relation loss), so its 16x16 level 3.
RELATION_LAYERS = {"unet_256": ("down_3",), "resnet_9blocks": ("bottleneck",)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, args = parse_config_arg(
        arg,
        config_name="distill_pix2pix_cityscapes.py",
        variants=("", "synthetic", "smoke"),
        choices={"arch": tuple(ARCHS), "student": ("32", "16", "8", "4", "2")},
    )
    if variant and "arch" in args:
        raise ValueError(
            f"distill_pix2pix_cityscapes.py:{arg}: arch= applies to Cityscapes only; the {variant} variant "
            "uses its teacher demo's ResNet (the U-Nets need 128 / 256 px)."
        )
    # The teacher run's config: data, networks and losses are the teacher's, then the student narrows G.
    config = pix2pix_cityscapes.get_config(variant)
    config.trainer = "distill_pix2pix"  # ganjax/trainers/pix2pix.py with a teacher
    if variant == "":
        config.model.generator = ARCHS[args.get("arch", "unet")]

    # ---- Teacher: the frozen generator of a pix2pix run ------------------------------------------
    config.teacher = teacher = ml_collections.ConfigDict()
    teacher.checkpoint = ""  # its --workdir (or checkpoints/<step>, or a converted PyTorch folder)
    teacher.ngf = config.model.ngf  # the teacher's width; model.ngf becomes the student's below
    teacher.norm = config.model.norm
    teacher.dropout = config.model.dropout
    teacher.train_mode = False  # teacher outputs in eval mode (running statistics, no dropout)
    teacher.init_discriminator = True  # D starts from the teacher run's

    # ---- Distillation losses (added to the generator loss) ---------------------------------------
    config.distill = distill = ml_collections.ConfigDict()
    distill.lambda_kd = 10.0  # |G_S(a) - G_T(a)|_1
    # relation_loss is at most 4/N (N positions; the normalised matrices' rows have unit norm), so its
    # weight scales with N: 10000 at the ResNet's 64x64 positions (256 px), 625 at the U-Net's 16x16.
    distill.lambda_sp = 625.0 if config.model.generator.startswith("unet") else 10000.0
    distill.relation_layers = RELATION_LAYERS.get(config.model.generator, ("bottleneck",))
    distill.relation_norm = "row"  # "row" (the paper: rows of A = Q Q^T) or "cosine" (rows of Q)
    distill.relation_method = "fused"  # "fused" (never forms N x N) or "dense" (the reference)

    # ---- Student: the teacher's architecture at width `student` -------------------------------
    if variant == "":
        config.model.ngf = int(args.get("student", "16"))
    elif variant == "synthetic":
        teacher.checkpoint = "runs/demo_p2p"  # the README's pix2pix demo (ResNet-6blocks, ngf 32)
        config.model.ngf = int(args.get("student", "8"))
        distill.lambda_sp = 625.0  # N = 16x16 at 64 px
    else:  # smoke: a 4-wide teacher, a 2-wide student
        config.model.ngf = int(args.get("student", "2"))
        distill.lambda_sp = 156.0  # N = 8x8
    return config
