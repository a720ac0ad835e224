"""pix2pix teacher (Isola et al. 2017) on Cityscapes labels -> photo (PAPERS.md §B; the reference's defaults).

Cityscapes in the pix2pix AB layout (cityscapes/train, cityscapes/val; see ganjax/data/image_folders.py for
where to get it), built once into TFDS and trained for the reference's 100 + 100 epochs at batch 1:
  python -m ganjax.main --config configs/pix2pix_cityscapes.py --workdir runs/cityscapes_teacher \
      --config.data.manual_dir=~/datasets
Other pix2pix folders (facades, maps, edges2shoes, ...): --config.data.dataset=facades plus the matching
direction (facades: BtoA, edges2shoes: AtoB) and train.num_steps / decay_steps = epochs x train images.
Built-in synthetic scenes, colourised layout -> summer photo at 64 px (no download, < 10 minutes on 2 CPU
cores, in-loop ground-truth L1 and label accuracy):
  python -m ganjax.main --config configs/pix2pix_cityscapes.py:synthetic --workdir runs/demo_pix2pix
Tiny model and few steps on built-in data, for tests:
  python -m ganjax.main --config configs/pix2pix_cityscapes.py:smoke --workdir /tmp/pix2pix_smoke
Evaluate the latest checkpoint of a run (metrics on synthetic data, a sample grid always):
  python -m ganjax.main --config configs/pix2pix_cityscapes.py --workdir runs/cityscapes_teacher --mode eval
"""

import ml_collections

VARIANTS = ("", "synthetic", "smoke")
CITYSCAPES_TRAIN_IMAGES = 2975


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = (arg or "").strip()
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r} for pix2pix_cityscapes.py; choose one of {VARIANTS}.")

    config = ml_collections.ConfigDict()
    config.trainer = "pix2pix"  # key into ganjax.main.TRAINERS
    config.seed = 0  # parameter init, dropout masks and data order all derive from it
    # Compute dtype of the networks: "float32" or "bfloat16" (GPU/TPU; parameters, optimizer states and
    # losses stay float32). XLA:CPU runs bfloat16 no faster than float32.
    config.dtype = "float32"

    # ---- Data (keys: ganjax.data.image_folders.make_translation_builder) ------------------------
    config.data = data = ml_collections.ConfigDict()
    data.name = "aligned_folders"  # "aligned_folders" (AB images on disk) or "synthetic_scenes" (built in)
    data.dataset = "cityscapes"  # folder name under manual_dir
    data.manual_dir = "~/datasets"  # the dataset folder or its parent
    data.data_dir = ""  # where TFDS stores prepared datasets; "" = TFDS default (~/tensorflow_datasets)
    data.load_size = 286  # train images are resized to this square size ...
    data.crop_size = 256  # ... then randomly cropped to this (the model's size; test images: resized)
    data.flip = True  # random horizontal flips (the same for input and target)
    data.direction = "BtoA"  # Cityscapes AB images are photo|labels: BtoA trains labels -> photo
    data.num_workers = 2  # grain worker processes (0 = read in the main process)
    data.test_split = ""  # split for evaluation and samples; "" = "test" if present, else "val"
    # Built-in synthetic scenes (used by the :synthetic and :smoke variants).
    data.synthetic = ml_collections.ConfigDict()
    data.synthetic.size = 64  # render size (pixels)
    data.synthetic.num_train = 2000  # train scenes
    data.synthetic.num_test = 200  # test scenes (with ground-truth photos and layouts)
    data.synthetic.domain_a = "label_image"  # A: the colourised layout (the Cityscapes label maps' role)
    data.synthetic.domain_b = "photo_a"  # B: the summer photo of the same scene

    # ---- Generator (the reference's pix2pix defaults) --------------------------------------------
    config.model = model = ml_collections.ConfigDict()
    model.generator = "unet_256"  # "unet_256", "unet_128", "resnet_9blocks" or "resnet_6blocks"
    model.ngf = 64  # channels of the first layer
    model.norm = "batch"  # "batch" (pix2pix) or "instance"
    model.dropout = True  # dropout 0.5 in the U-Net's inner decoder levels / ResNet blocks
    # G and D convs: "auto" (by backend: "winograd" on CPU, "reference" elsewhere), "winograd" (XLA:CPU
    # rewrites + Winograd for wide 3x3/4x4 convs), "fast" (the rewrites alone: XLA's rounding), "reference"
    model.conv_impl = "auto"

    # ---- Discriminator: conditional PatchGAN on concat(input, image) -------------------------------
    config.disc = disc = ml_collections.ConfigDict()
    disc.features = 64  # ndf: width of the first layer
    disc.num_layers = 3  # stride-2 layers (3 = the 70x70 PatchGAN)
    disc.norm = "batch"  # "batch" (pix2pix) or "instance"

    # ---- Losses ---------------------------------------------------------------------------------
    config.loss = loss = ml_collections.ConfigDict()
    loss.adversarial = "vanilla"  # pix2pix's BCE GAN loss; "lsgan", "hinge" also work
    loss.l1_weight = 100.0  # lambda_L1: |G(a) - b|_1

    # ---- Optimisation: Adam, constant then linear decay to ~0 ----------------------------------
    config.train = train = ml_collections.ConfigDict()
    train.num_steps = 200 * CITYSCAPES_TRAIN_IMAGES  # n_epochs + n_epochs_decay = 100 + 100 epochs
    train.decay_steps = 100 * CITYSCAPES_TRAIN_IMAGES  # the last n_epochs_decay epochs decay linearly
    train.batch_size = 1  # global batch; a multiple of data x fsdp (see config.mesh)
    train.learning_rate = 2e-4  # G and D
    train.b1 = 0.5
    train.b2 = 0.999

    # ---- Initialisation from other runs (used only when the workdir has no checkpoint) --------
    config.init_from = ml_collections.ConfigDict()
    config.init_from.generator = ""  # workdir (or checkpoints/<step>) of a pix2pix run: its G
    config.init_from.discriminator = ""  # ... its D

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
    config.log.sample_every_steps = 5000  # (input, output, target) grid: PNG in workdir/samples + TensorBoard
    config.log.sample_images = 8  # rows of the grid (the first test images)
    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 5000  # ground-truth L1 and label accuracy (synthetic scenes only)
    config.eval.num_examples = 200  # test images scored
    config.eval.batch_size = 8  # test images per generator call (rounded up to the data axis)
    config.eval.train_mode = True  # the reference's test protocol: batch norm on each image, dropout on
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
        data.direction = "AtoB"
        data.load_size = data.crop_size = 64  # no resize jitter: outputs are compared pixel by pixel
        data.num_workers = 0  # 64 px PNGs decode faster than worker processes start
        model.generator = "resnet_6blocks"  # the U-Nets need 128 / 256 px
        model.ngf = 32
        model.norm = "instance"
        model.dropout = False
        disc.features = 32
        disc.num_layers = 3
        train.num_steps = 6000
        train.decay_steps = 2000
        train.batch_size = 1
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
        model.norm = "batch"  # the reference's batch norm and dropout, on the small ResNet
        model.dropout = True
        disc.features = 4
        disc.num_layers = 2
        disc.norm = "batch"
        train.num_steps = 4
        train.decay_steps = 2
        train.batch_size = 8
        config.log.every_steps = 1
        config.log.sample_every_steps = 4
        config.log.sample_images = 2
        config.eval.every_steps = 4
        config.eval.num_examples = 4
        config.eval.batch_size = 8
        config.checkpoint.every_steps = 2
    return config
