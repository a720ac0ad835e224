"""CycleGAN teacher (Zhu et al. 2017) on horse <-> zebra (PAPERS.md §B; the reference's defaults).

horse2zebra in the CycleGAN layout (horse2zebra/trainA, trainB, testA, testB; see ganjax/data/image_folders.py
for where to get it), built once into TFDS and trained for the reference's 100 + 100 epochs at batch 1:
  python -m ganjax.main --config configs/cyclegan_horse2zebra.py --workdir runs/h2z_teacher \
      --config.data.manual_dir=~/datasets
The other unpaired sets of §B are the same config with another folder and its epoch length (200 epochs of
max(|trainA|, |trainB|) steps; `python -m ganjax.data.prepare --dataset unaligned_folders --folder NAME`
prints the folder sizes):
  --config.data.dataset=summer2winter_yosemite \
      --config.train.num_steps=246200 --config.train.decay_steps=123100   (1231 summer images)
  --config.data.dataset=apple2orange \
      --config.train.num_steps=203800 --config.train.decay_steps=101900   (1019 oranges)
  --config.data.dataset=tiger2leopard   (not in the reference's download script: put tigers in trainA/testA,
      leopards in trainB/testB; steps as above)
Built-in synthetic scenes, summer photo <-> winter photo at 64 px (no download, < 10 minutes on 2 CPU cores,
in-loop ground-truth L1 and label accuracy for both directions):
  python -m ganjax.main --config configs/cyclegan_horse2zebra.py:synthetic --workdir runs/demo_teacher
Tiny model and few steps on built-in data, for tests:
  python -m ganjax.main --config configs/cyclegan_horse2zebra.py:smoke --workdir /tmp/cyclegan_smoke
Evaluate the latest checkpoint of a run (metrics on synthetic data, sample grids always):
  python -m ganjax.main --config configs/cyclegan_horse2zebra.py --workdir runs/h2z_teacher --mode eval
"""

import ml_collections

VARIANTS = ("", "synthetic", "smoke")
HORSE2ZEBRA_EPOCH = 1334  # max(|trainA| = 1067 horses, |trainB| = 1334 zebras): the reference's epoch


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = (arg or "").strip()
    if variant not in VARIANTS:
        raise ValueError(
            f"Unknown variant {variant!r} for cyclegan_horse2zebra.py; choose one of {VARIANTS}."
        )

    config = ml_collections.ConfigDict()
    config.trainer = "cyclegan"  # key into ganjax.main.TRAINERS
    config.seed = 0  # parameter init, image-pool draws and data order all derive from it
    # Compute dtype of the networks: "float32" or "bfloat16" (GPU/TPU; parameters, optimizer states and
    # losses stay float32). XLA:CPU runs bfloat16 no faster than float32.
    config.dtype = "float32"

    # ---- Data (keys: ganjax.data.image_folders.make_translation_builder) ------------------------
    config.data = data = ml_collections.ConfigDict()
    data.name = "unaligned_folders"  # "unaligned_folders" (trainA/trainB on disk) or "synthetic_scenes"
    data.dataset = "horse2zebra"  # folder name under manual_dir
    data.manual_dir = "~/datasets"  # the dataset folder or its parent
    data.data_dir = ""  # where TFDS stores prepared datasets; "" = TFDS default (~/tensorflow_datasets)
    data.load_size = 286  # train images are resized to this square size ...
    data.crop_size = 256  # ... then randomly cropped to this (the model's size; test images: resized)
    data.flip = True  # random horizontal flips (independent for A and B)
    data.direction = "AtoB"  # which folder is domain A (G_A's input): AtoB = trainA
    data.num_workers = 2  # grain worker processes (0 = read in the main process)
    data.test_split = ""  # aligned folders only: split for evaluation; "" = "test", else "val"
    # Built-in synthetic scenes (used by the :synthetic and :smoke variants); A and B come from disjoint
    # scenes in training (even / odd records), so the training data is genuinely unpaired.
    data.synthetic = ml_collections.ConfigDict()
    data.synthetic.size = 64  # render size (pixels)
    data.synthetic.num_train = 2000  # train scenes (1000 per domain)
    data.synthetic.num_test = 200  # test scenes (with both photos and the layout: ground truth)
    data.synthetic.domain_a = "photo_a"  # A: summer day
    data.synthetic.domain_b = "photo_b"  # B: the same kind of scene in winter at dusk

    # ---- Generators G_A, G_B (the reference's CycleGAN defaults) ----------------------------------
    config.model = model = ml_collections.ConfigDict()
    model.generator = "resnet_9blocks"  # "resnet_9blocks", "resnet_6blocks", "unet_256" or "unet_128"
    model.ngf = 64  # channels of the first layer
    model.norm = "instance"  # "instance" (CycleGAN) or "batch"
    model.dropout = False  # CycleGAN's --no_dropout default
    # G and D convs: "auto" (by backend: "winograd" on CPU, "reference" elsewhere), "winograd" (XLA:CPU
    # rewrites + Winograd for wide 3x3/4x4 convs), "fast" (the rewrites alone: XLA's rounding), "reference"
    model.conv_impl = "auto"

    # ---- Discriminators D_A, D_B: PatchGAN ------------------------------------------------------
    config.disc = disc = ml_collections.ConfigDict()
    disc.features = 64  # ndf: width of the first layer
    disc.num_layers = 3  # stride-2 layers (3 = the 70x70 PatchGAN)
    disc.norm = "instance"  # "instance" (CycleGAN) or "batch"

    # ---- Losses ---------------------------------------------------------------------------------
    config.loss = loss = ml_collections.ConfigDict()
    loss.adversarial = "lsgan"  # CycleGAN's least-squares GAN loss; "vanilla", "hinge" also work
    loss.cycle_a_weight = 10.0  # lambda_A: |G_B(G_A(a)) - a|_1
    loss.cycle_b_weight = 10.0  # lambda_B: |G_A(G_B(b)) - b|_1
    loss.identity_weight = 0.5  # lambda_idt: |G_A(b) - b| x lambda_B x this (+ the same for G_B); 0 = off

    # ---- Optimisation: Adam, constant then linear decay to ~0 ----------------------------------
    config.train = train = ml_collections.ConfigDict()
    train.num_steps = 200 * HORSE2ZEBRA_EPOCH  # n_epochs + n_epochs_decay = 100 + 100 epochs
    train.decay_steps = 100 * HORSE2ZEBRA_EPOCH  # the last n_epochs_decay epochs decay linearly
    train.batch_size = 1  # global batch; a multiple of data x fsdp (see config.mesh)
    train.learning_rate = 2e-4  # generators and discriminators
    train.b1 = 0.5
    train.b2 = 0.999
    train.pool_size = 50  # generated images kept per discriminator (0 = D sees only the newest)

    # ---- Initialisation from other runs (used only when the workdir has no checkpoint) --------
    config.init_from = ml_collections.ConfigDict()
    config.init_from.generator = ""  # workdir (or checkpoints/<step>) of a CycleGAN run: its G_A, G_B
    config.init_from.discriminator = ""  # ... its D_A, D_B

    # ---- Mesh and partitioning (ganjax/sharding.py; docs/scale.md) ------------------------
    config.mesh = ml_collections.ConfigDict()
    # Axis sizes, -1 = all remaining devices. The batch is split over data x fsdp; parameters and
    # optimizer state are split over fsdp (fsdp = 1: everything replicated, plain data parallelism).
    config.mesh.axes = (("data", -1), ("fsdp", 1))
    # (regex searched in each state path, "fsdp" | "replicate" | PartitionSpec tuple), first match
    # wins, no match = replicated. "fsdp" splits a leaf's largest axis divisible by the fsdp size.
    config.mesh.rules = ((r".*", "fsdp"),)
    config.mesh.min_shard_size = 2**16  # elements; smaller arrays stay replicated (all-gather latency)

    # ---- Periodic actions ---------------------------------------------------------------------
    config.log = ml_collections.ConfigDict()
    config.log.every_steps = 100  # scalars to TensorBoard and workdir/metrics.jsonl
    config.log.sample_every_steps = 5000  # grids per direction: PNG in workdir/samples + TensorBoard
    config.log.sample_images = 8  # rows of each grid (the first test images)
    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 5000  # ground-truth L1 and label accuracy (synthetic scenes only)
    config.eval.num_examples = 200  # test images scored per direction
    config.eval.batch_size = 8  # test images per generator call (rounded up to the data axis)
    config.eval.train_mode = True  # the reference's test protocol (matters only with batch norm / dropout)
    # --mode eval (ganjax/evaluation/offline.py, translation_offline.py), in a separate process
    config.eval.step = -1  # checkpoint to evaluate; -1 = the latest
    config.eval.watch = False  # keep evaluating new checkpoints until train.num_steps is done
    config.eval.poll_seconds = 60.0  # watch: seconds between looks for a new checkpoint
    config.eval.watch_timeout = 6 * 3600.0  # watch: stop after this long without a new checkpoint (s)
    config.eval.inception_weights = ""  # pytorch-fid's Inception .pth (or its .npz) for FID/KID; "" = skip
    config.eval.segmenter = ""  # FCN-score model: jax.export file or "module:function" (segmentation.py)
    config.eval.segmentation_labels = ""  # real data: folder of label maps, one per test image (sorted names)
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 5000
    config.checkpoint.keep = 3  # most recent checkpoints kept

    if variant in ("synthetic", "smoke"):
        data.name = "synthetic_scenes"
        data.dataset = ""
        data.load_size = data.crop_size = 64  # no resize jitter: outputs are compared pixel by pixel
        data.num_workers = 0  # 64 px PNGs decode faster than worker processes start
        model.generator = "resnet_6blocks"
        model.ngf = 16
        disc.features = 32
        disc.num_layers = 3
        train.num_steps = 4500
        train.decay_steps = 1500
        train.batch_size = 1
        train.learning_rate = 5e-4  # faster than 2e-4 for this small model and short run
        config.log.every_steps = 50
        config.log.sample_every_steps = 1000
        config.eval.every_steps = 1000
        config.eval.num_examples = 100
        config.eval.batch_size = 20
        config.checkpoint.every_steps = 1000
    if variant == "smoke":
        data.load_size = data.crop_size = 32
        data.synthetic.size = 32
        data.synthetic.num_train = 16
        data.synthetic.num_test = 4
        model.ngf = 4
        disc.features = 4
        disc.num_layers = 2
        train.num_steps = 4
        train.decay_steps = 2
        train.batch_size = 8
        train.pool_size = 6  # fills in the first step, swaps from the second
        config.log.every_steps = 1
        config.log.sample_every_steps = 4
        config.log.sample_images = 2
        config.eval.every_steps = 4
        config.eval.num_examples = 4
        config.eval.batch_size = 8
        config.checkpoint.every_steps = 2
    return config
