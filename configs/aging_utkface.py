"""Continuous face aging via self-estimated residual age embedding (CVPR 2021; PAPERS.md §A).

UTKFace on disk (download the aligned-and-cropped "UTKFace.tar.gz", unpack it, point data.manual_dir at it):
  python -m ganjax.main --config configs/aging_utkface.py --workdir runs/utk \
      --config.data.manual_dir=~/data/UTKFace
Built-in synthetic faces (no download, 64 px, about 9.5 minutes on 2 CPU cores):
  python -m ganjax.main --config configs/aging_utkface.py:synthetic --workdir runs/demo
Tiny model and few steps on built-in data, for tests:
  python -m ganjax.main --config configs/aging_utkface.py:smoke --workdir /tmp/aging_smoke
"""

import ml_collections

VARIANTS = ("", "synthetic", "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = (arg or "").strip()
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r} for aging_utkface.py; choose one of {VARIANTS}.")

    config = ml_collections.ConfigDict()
    config.trainer = "aging"  # key into ganjax.main.TRAINERS
    config.seed = 0  # parameter init, target-age sampling and data order all derive from it
    # Compute dtype of the networks: "float32" or "bfloat16" (GPU/TPU; parameters, optimizer states and
    # losses stay float32). XLA:CPU runs bfloat16 no faster than float32.
    config.dtype = "float32"

    # ---- Data -------------------------------------------------------------------------------------
    config.data = data = ml_collections.ConfigDict()
    data.name = "utkface"  # "utkface" (local files) or "synthetic_faces" (built in, generated locally)
    data.data_dir = ""  # where TFDS stores prepared datasets; "" = TFDS default (~/tensorflow_datasets)
    data.manual_dir = "~/data/UTKFace"  # UTKFace only: folder with the original *.jpg(.chip.jpg) files
    data.size = 128  # model input resolution (pixels, square); images are resized/cropped to it
    data.flip = True  # random horizontal flips during training
    data.num_workers = 2  # grain worker processes (0 = read in the main process)
    data.age_min = 0.0  # target ages are sampled uniformly from [age_min, age_max] (years)
    data.age_max = 100.0
    data.eval_examples = 256  # held-out faces used for the in-loop age MAE
    # UTKFace builder: images are stored square at this size, the split is a hash of the file name.
    data.utkface = ml_collections.ConfigDict()
    data.utkface.stored_size = 128
    data.utkface.test_percent = 10
    # Built-in synthetic faces (used by the :synthetic and :smoke variants).
    data.synthetic = ml_collections.ConfigDict()
    data.synthetic.num_train = 4000  # train split: this many identities, each at one random age
    data.synthetic.num_test_identities = 32  # test split: held-out identities ...
    data.synthetic.test_ages = (5, 15, 25, 35, 45, 55, 65, 75, 85)  # ... each rendered at these ages

    # ---- Model (PAPERS.md §A) -------------------------------------------------------------------
    config.model = model = ml_collections.ConfigDict()
    model.num_ages = 101  # K: one estimator class per integer age 0..K-1; labels are clipped into it
    model.base_features = 32  # channels of the encoder stem; doubled at each downsampling
    model.num_downsamples = 2  # encoder feature map F is size / 2**num_downsamples
    model.num_encoder_blocks = 4  # residual blocks at the bottleneck of the encoder
    model.num_decoder_blocks = 4  # conditioned residual blocks of the decoder
    model.output = "image"  # "image": decoder draws the face; "residual": a change added to x;
    # "mask": colours painted over x through a drawn mask (m c + (1 - m) x)
    config.aging = aging = ml_collections.ConfigDict()
    aging.basis = "weights"  # aging basis a(t) = estimator row t ("weights") or its L2-normalised form
    aging.current_age = "estimated"  # residual r = e - a(current): "estimated" (y_hat) or "label"
    # e_t = e + basis_scale * (a(target) - a(current)); 1 is the paper's formula as written. The estimator's
    # rows stay small next to e under cross-entropy (|e| ~ 27 vs |a(80) - a(10)| ~ 1.7 on the synthetic
    # faces), so at 1 the decoder learns to ignore the target age; 10 makes the step count (README, aging).
    aging.basis_scale = 10.0
    aging.replace_feature_mean = True  # decoder input F - GAP(F) + e_t, so F's own age cannot bypass e_t
    aging.conditioning = "adain"  # how e_t conditions the decoder: "adain", "channel_scale", "concat"

    # ---- Discriminator ------------------------------------------------------------------------
    config.disc = disc = ml_collections.ConfigDict()
    disc.features = 64  # PatchGAN width of the first layer
    disc.num_layers = 3  # PatchGAN stride-2 layers (3 = the 70x70 PatchGAN)
    disc.norm = "instance"  # "instance" or "batch" (batch statistics of the current batch)
    disc.age_conditioned = False  # projection-conditioned on the target age

    # ---- Losses (weights) ---------------------------------------------------------------------
    config.loss = loss = ml_collections.ConfigDict()
    loss.adversarial = "lsgan"  # "lsgan", "nonsaturating" or "hinge"
    loss.adversarial_weight = 1.0
    loss.estimator_weight = 1.0  # cross-entropy of the embedded estimator on real faces
    # Label width (years) of the estimator's and the age loss's cross-entropy: 0 = (two-)hot labels, the
    # paper's; > 0 = Gaussian label distribution (DLDL), smoothing the aging basis across neighbouring ages.
    loss.age_label_sigma = 0.0
    loss.mean_variance = False  # add the mean-variance age loss on real faces
    loss.mean_weight = 0.2
    loss.variance_weight = 0.05
    loss.age_weight = 1.0  # the estimator must read the target age off the generated face
    # None: a constant age weight. A number: the weight moves linearly from age_weight at step 0 to this at
    # loss.age_weight_steps (a strong start gets G to use the target age, a weak end leaves G less reason
    # to fool the embedded age judge with artefacts instead of aging the face).
    loss.age_weight_end = ml_collections.config_dict.placeholder(float)
    # The step at which the age weight reaches age_weight_end and then stays; None = train.num_steps.
    loss.age_weight_steps = ml_collections.config_dict.placeholder(int)
    loss.reconstruction_weight = 10.0  # |G(x, y_hat) - x|_1
    loss.cycle_weight = 0.0  # |G(G(x, t), y_hat) - x|_1 (off by default)
    loss.mask_weight = 0.0  # mean of the blend mask of model.output = "mask" on aged faces
    # model.output = "mask": |c(x, y_hat) - x|_1, the colours drawn under the mask at reconstruction must
    # be the input face itself. Without it the colour layer learns only where the mask opens on aged faces.
    loss.colour_weight = 0.0
    loss.r1_weight = 0.0  # R1 gradient penalty on real images (gamma / 2 * |grad D|^2)

    # ---- Optimisation -------------------------------------------------------------------------
    config.train = train = ml_collections.ConfigDict()
    train.num_steps = 100_000
    train.batch_size = 32  # global batch; a multiple of data x fsdp (see config.mesh)
    train.g_learning_rate = 2e-4
    train.d_learning_rate = 2e-4
    train.decay_steps = 0  # the last decay_steps updates decay both rates linearly towards 0
    train.b1 = 0.5
    train.b2 = 0.999
    train.ema_decay = 0.999  # generator EMA used for samples and evaluation (0 disables)

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
    config.log.sample_every_steps = 2000  # age-progression grid (PNG + TensorBoard)
    config.log.sample_faces = 8  # rows of the grid
    config.log.sample_ages = (10, 20, 30, 40, 50, 60, 70, 80)  # columns of the grid (after the input)
    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 2000  # in-loop evaluation (age MAE, ground-truth L1 on synthetic data)
    # --mode eval (ganjax/evaluation/offline.py, aging_offline.py): EMA and raw G, a separate process
    config.eval.step = -1  # checkpoint to evaluate; -1 = the latest
    config.eval.watch = False  # keep evaluating new checkpoints until train.num_steps is done
    config.eval.poll_seconds = 60.0  # watch: seconds between looks for a new checkpoint
    config.eval.watch_timeout = 6 * 3600.0  # watch: stop after this long without a new checkpoint (s)
    config.eval.regressor = ""  # workdir of a configs/age_regressor.py run (the judge); "" = skip
    config.eval.target_ages = (10, 20, 30, 40, 50, 60, 70, 80)  # held-out faces are aged to these ages
    config.eval.identity_upsample = 1  # dlib detector upsampling for identity (2 for faces under ~40 px)
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 2000
    config.checkpoint.keep = 3  # most recent checkpoints kept

    if variant in ("synthetic", "smoke"):
        data.name = "synthetic_faces"
        data.size = 64
        data.age_min, data.age_max = 0.0, 90.0
        data.eval_examples = 128
        # Sized for under 10 minutes on 2 CPU cores (~6 steps/s, 9 min 22 s): a narrow model, batch 8,
        # and a mask decoder (out = m c + (1 - m) x) so that identity detail need not be relearned through
        # the bottleneck and hair that greys is painted over as a whole: ground-truth L1 / copy 0.82 / 0.75
        # / 0.85 for seeds 0 / 1 / 2 at 2400 steps (one core each), against 0.95 / 0.85 / 0.85 with the
        # residual decoder. A weak age loss leaves G less reason to fool the embedded age judge with
        # artefacts (constant 0.3: 0.79 / - / 0.79; 0.1: 0.70 / 0.78 / 0.74) but may never get G to use
        # the target age (0.1 with loss.colour_weight 2 on 2 cores: ratio 1.00 throughout), so the weight
        # falls from 1 to 0 over the first two thirds of the run and stays 0 (the last third cleans up
        # what fooling the judge left): 3000 steps, seeds 0-3 on one core 0.67 / 0.62 / 0.68 / 0.68, seeds
        # 0-2 on 2 cores 0.68 / 0.67 / 0.70 (the Winograd D conv since: seed 0 on 2 cores 0.676; earlier
        # convolution code: 0.69 / 0.67 / 0.76 / 0.67 and 0.69 / 0.69 / 0.72); falling over the whole run:
        # 0.73 / 0.72 at 2400 steps, 0.67 / 0.67 at 3200 (README; those with earlier code too).
        # The age-conditioned D (an option of the paper) shows it what each age looks like (0.83 vs 0.92
        # with the unconditional one). D learns as fast as G: with D at 2e-4, seed 2 of 3 let G fool the
        # embedded age judge with artefacts instead of aging (1.44). Numbers: README, face aging.
        disc.age_conditioned = True
        model.base_features = 16
        model.num_encoder_blocks = 3
        model.num_decoder_blocks = 3
        model.output = "mask"
        disc.features = 32
        train.num_steps = 3000
        train.batch_size = 8
        loss.age_weight_end = 0.0
        loss.age_weight_steps = 2000
        train.g_learning_rate = 5e-4
        train.d_learning_rate = 5e-4
        train.ema_decay = 0.99
        config.log.every_steps = 50
        config.log.sample_every_steps = 1000
        config.eval.every_steps = 1000  # each in-loop evaluation takes ~11 s of the 10 minutes
        config.checkpoint.every_steps = 1000
    if variant == "smoke":
        data.size = 32
        data.num_workers = 0
        data.eval_examples = 16
        data.synthetic.num_train = 64
        data.synthetic.num_test_identities = 4
        data.synthetic.test_ages = (10, 40, 70)
        model.base_features = 8
        model.num_downsamples = 2
        model.num_encoder_blocks = 1
        model.num_decoder_blocks = 1
        disc.features = 8
        disc.num_layers = 2
        train.num_steps = 6
        train.batch_size = 8
        loss.age_weight_steps = 4  # the demo's schedule shape: falls over two thirds, then constant
        config.log.every_steps = 2
        config.log.sample_every_steps = 6
        config.log.sample_faces = 2
        config.log.sample_ages = (20, 60)
        config.eval.target_ages = (20, 60)
        config.eval.every_steps = 6
        config.checkpoint.every_steps = 3
    return config
