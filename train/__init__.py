"""The margin-jax reference training pipeline (Flax NNX, tfds, orbax).

``python -m train.main --config train/configs/default.py --workdir DIR``
trains an embedding model with any loss of margin_jax and evaluates it
open-set on held-out identities. See `train.train.train_and_evaluate`.
"""
