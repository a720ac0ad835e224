"""An independent age regressor (ganjax/models/age_regressor.py), the judge of aged faces (PAPERS.md §A).

Train it on the same dataset as the aging run, then point the aging run's evaluation at it:
  python -m ganjax.main --config configs/age_regressor.py --workdir runs/utk_regressor \
      --config.data.manual_dir=~/data/UTKFace
  python -m ganjax.main --config configs/aging_utkface.py --workdir runs/utk --mode eval \
      --config.eval.regressor=runs/utk_regressor
Built-in synthetic faces (no download; the judge of configs/aging_utkface.py:synthetic runs):
  python -m ganjax.main --config configs/age_regressor.py:synthetic --workdir runs/demo_regressor
Tiny model and few steps on built-in data, for tests:
  python -m ganjax.main --config configs/age_regressor.py:smoke --workdir /tmp/regressor_smoke
Evaluate a run's latest checkpoint (test MAE; writes WORKDIR/eval/<step>.json and results.md):
  python -m ganjax.main --config configs/age_regressor.py --workdir runs/utk_regressor --mode eval

The data block is the aging config's (configs/aging_utkface.py), so with the same data settings both
runs read the same prepared dataset and the same train/test split.
"""

import ml_collections

VARIANTS = ("", "synthetic", "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = (arg or "").strip()
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r} for age_regressor.py; choose one of {VARIANTS}.")

    config = ml_collections.ConfigDict()
    config.trainer = "age_regressor"  # key into ganjax.main.TRAINERS
    config.seed = 0  # parameter init, dropout and data order all derive from it

    # ---- Data (the keys of configs/aging_utkface.py's data block) --------------------------------
    config.data = data = ml_collections.ConfigDict()
    data.name = "utkface"  # "utkface" (local files) or "synthetic_faces" (built in)
    data.data_dir = ""  # where TFDS stores prepared datasets; "" = TFDS default (~/tensorflow_datasets)
    data.manual_dir = "~/data/UTKFace"  # UTKFace only: folder with the original *.jpg(.chip.jpg) files
    data.size = 128  # input resolution; aged faces of another size are resized to it when judged
    data.flip = True  # random horizontal flips during training
    data.num_workers = 2  # grain worker processes (0 = read in the main process)
    data.eval_examples = 2048  # test faces scored by the in-loop and --mode eval MAE (all if fewer)
    data.utkface = ml_collections.ConfigDict()
    data.utkface.stored_size = 128
    data.utkface.test_percent = 10  # must match the aging run's, so the judge never saw its test faces
    data.synthetic = ml_collections.ConfigDict()
    data.synthetic.num_train = 4000
    data.synthetic.num_test_identities = 32
    data.synthetic.test_ages = (5, 15, 25, 35, 45, 55, 65, 75, 85)

    # ---- Model ----------------------------------------------------------------------------------
    config.model = model = ml_collections.ConfigDict()
    model.num_ages = 101  # one class per integer age 0..100; labels are clipped into it
    model.features = (32, 64, 128, 256)  # stage widths; each stage but the last halves the resolution
    model.convs_per_stage = 2  # 3x3 conv + GroupNorm + ReLU layers per stage
    model.dropout = 0.2  # before the classifier, training only

    # ---- Loss -----------------------------------------------------------------------------------
    config.loss = loss = ml_collections.ConfigDict()
    loss.cross_entropy_weight = 1.0  # DEX: cross-entropy against the (two-hot) age label
    loss.l1_weight = 0.05  # |expected age - label| in years: aims the readout at the MAE directly

    # ---- Optimisation: AdamW, linear warm-up then cosine decay ----------------------------------
    config.train = train = ml_collections.ConfigDict()
    train.num_steps = 30_000
    train.batch_size = 64  # global batch; a multiple of data x fsdp (see config.mesh)
    train.learning_rate = 1e-3
    train.warmup_steps = 500
    train.weight_decay = 1e-4

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
    config.log.sample_every_steps = 5000  # no pictures: the regressor writes none (kept for the loop)
    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 2000  # test-split MAE
    config.eval.batch_size = 64  # test faces per call (rounded up to the data axis)
    # --mode eval (ganjax/evaluation/offline.py)
    config.eval.step = -1  # checkpoint to evaluate; -1 = the latest
    config.eval.watch = False  # keep evaluating new checkpoints until train.num_steps is done
    config.eval.poll_seconds = 60.0  # watch: seconds between looks for a new checkpoint
    config.eval.watch_timeout = 6 * 3600.0  # watch: stop after this long without a new checkpoint (s)
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 2000
    config.checkpoint.keep = 3  # most recent checkpoints kept

    if variant in ("synthetic", "smoke"):
        # The data of configs/aging_utkface.py:synthetic (same prepared dataset).
        data.name = "synthetic_faces"
        data.size = 64
        data.num_workers = 0
        model.features = (16, 32, 64, 128)
        train.num_steps = 3000
        train.batch_size = 32
        train.warmup_steps = 200
        config.log.every_steps = 50
        config.eval.every_steps = 500
        config.checkpoint.every_steps = 1000
    if variant == "smoke":
        # The data of configs/aging_utkface.py:smoke (same prepared dataset).
        data.size = 32
        data.eval_examples = 16
        data.synthetic.num_train = 64
        data.synthetic.num_test_identities = 4
        data.synthetic.test_ages = (10, 40, 70)
        model.features = (4, 8)
        model.convs_per_stage = 1
        train.num_steps = 4
        train.batch_size = 8
        train.warmup_steps = 1
        config.log.every_steps = 2
        config.log.sample_every_steps = 4
        config.eval.every_steps = 4
        config.eval.batch_size = 8
        config.checkpoint.every_steps = 2
    return config
