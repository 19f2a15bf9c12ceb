"""Faces at 112x112: IResNet-50, 512-d, ArcFace (s=64, m=0.5) on MS1MV2.

insightface's arcface_torch recipe (configs/ms1mv2_r50.py): SGD lr 0.1,
momentum 0.9, weight decay 5e-4, 128 images per GPU on 8 GPUs, 20 epochs of
the 5.8M images, bfloat16 compute for the convolutional body. Two
differences: the schedule is this pipeline's warm-up + cosine (insightface:
polynomial decay, no warm-up), and its SGD is Nesterov.

    python -m train.prepare_recordio MS1MV2_DIR --data_dir DATA_DIR   # once
    python -m train.main --config train/configs/face112.py --workdir DIR \\
        --config.data_dir=DATA_DIR \\
        --config.val_targets="('MS1MV2_DIR/lfw.bin','MS1MV2_DIR/cfp_fp.bin')"
    python -m train.main --config train/configs/face112.py \\
        --config.synthetic=True --workdir DIR   # throughput only
"""

import ml_collections

from train.configs import default

NUM_DEVICES = 8  # config.batch_size is global: 128 per device on 8 devices
NUM_IMAGES = 5_822_653  # MS1MV2
NUM_EPOCHS = 20


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    # Data: an insightface RecordIO set (train.rec / train.idx, as distributed
    # for MS1MV2, Glint360K, WebFace42M) through the tfds builder of
    # train/recordio_builder.py (bare name = its 112x112 config); prepare it
    # once with python -m train.prepare_recordio MANUAL_DIR --data_dir DIR.
    config.dataset = "insightface_recordio"
    config.split = "train"
    # All of MS1MV2's identities (Glint360K: 360232); W is [C, 512].
    config.num_train_classes = 85742
    # Random images, for throughput measurement: no data set is read, the
    # model, loss and step are the real ones.
    config.synthetic = False
    config.synthetic_image_shape = (112, 112, 3)
    # Decoding the JPEGs takes worker processes; faces are flipped at random.
    config.data_workers = 8
    config.random_flip = True
    config.random_affine = ml_collections.ConfigDict(
        {"rotation": 0.0, "scale": 0.0, "translation": 0.0}
    )  # insightface: flips only
    config.sampler = "random"
    config.batch_size = 128 * NUM_DEVICES
    # Model.
    config.model = "iresnet50"  # or iresnet18 / iresnet34 / iresnet100
    config.width_multiplier = 1.0
    config.embedding_dim = 512
    config.dropout = 0.0
    config.compute_dtype = "bfloat16"  # or "float32"; parameters stay float32
    # Loss: ArcFace at its published scale and margin (85k classes).
    config.loss = ml_collections.ConfigDict(
        {"name": "arcface", "scale": 64.0, "margin": 0.5}
    )
    # Optimiser.
    config.optimizer = "sgd"
    config.learning_rate = 0.1
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.num_train_steps = NUM_EPOCHS * NUM_IMAGES // config.batch_size
    config.warmup_steps = NUM_IMAGES // config.batch_size  # one epoch
    config.end_lr_factor = 0.0
    # Verification sets, as insightface's CallBackVerification (every 2000
    # steps): the .bin files that ship with MS1MV2 / Glint360K, e.g.
    # --config.val_targets="('DIR/lfw.bin','DIR/cfp_fp.bin','DIR/agedb_30.bin')".
    # Every identity trains, so they are what the run is judged by.
    config.val_targets = ()
    config.val_every_steps = 2000
    # Bookkeeping.
    config.log_every_steps = 100
    config.checkpoint_every_steps = 5000
    config.keep_checkpoints = 3
    config.progress_bar = False
    config.plots = False
    return config
