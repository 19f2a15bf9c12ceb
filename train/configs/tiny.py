"""CPU smoke test: a very small model on the digits, a few steps, no plots."""

from train.configs import digits


def get_config():
    config = digits.get_config()
    config.width = 4
    config.embedding_dim = 8
    config.batch_size = 16
    config.warmup_steps = 1
    config.num_train_steps = 4
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.eval_num_pairs = 200
    config.tensorboard = False
    config.progress_bar = False
    config.plots = False
    return config
