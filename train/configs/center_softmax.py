"""Center loss + softmax (Wen et al. 2016): CE on x·Wᵀ + λ·center loss.

The centres are loss state (never in the optimiser), moved each step by the
rule of the paper (rate alpha) over the global batch. λ = 0.003 is the
paper's weight against softmax; classifier="normface" uses the normalised
softmax at ``scale`` instead of the plain one.
"""

from train.configs._family import with_loss


def get_config(base="default"):
    return with_loss("center_softmax", base)
