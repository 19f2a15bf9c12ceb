"""margin-jax: margin-based softmax and metric-learning losses in JAX.

Pure, jittable functions; see the README for the pipeline and SPEC for formulas.
"""

from margin_jax.adaptive import CurricularState as CurricularState
from margin_jax.adaptive import adacos_dynamic_scale as adacos_dynamic_scale
from margin_jax.adaptive import adacos_fixed_scale as adacos_fixed_scale
from margin_jax.adaptive import init_curricular_state as init_curricular_state
from margin_jax.adaptive import update_curricular_state as update_curricular_state
from margin_jax.centers import CenterState as CenterState
from margin_jax.centers import center_loss as center_loss
from margin_jax.centers import init_centers as init_centers
from margin_jax.centers import update_centers as update_centers
from margin_jax.chunked import PartialFCSample as PartialFCSample
from margin_jax.chunked import chunked_margin_loss as chunked_margin_loss
from margin_jax.chunked import non_target_logsumexp as non_target_logsumexp
from margin_jax.chunked import partial_fc_sample as partial_fc_sample
from margin_jax.chunked import sharded_margin_loss as sharded_margin_loss
from margin_jax.cosine import cosine_logits as cosine_logits
from margin_jax.cosine import l2_normalize as l2_normalize
from margin_jax.cosine import put_target as put_target
from margin_jax.cosine import safe_arccos as safe_arccos
from margin_jax.cosine import safe_sin as safe_sin
from margin_jax.cosine import take_target as take_target
from margin_jax.cosine import target_mask as target_mask
from margin_jax.losses import adacos_loss as adacos_loss
from margin_jax.losses import arcface_loss as arcface_loss
from margin_jax.losses import combined_margin_loss as combined_margin_loss
from margin_jax.losses import cosface_loss as cosface_loss
from margin_jax.losses import curricularface_loss as curricularface_loss
from margin_jax.losses import eqm_loss as eqm_loss
from margin_jax.losses import focal_loss as focal_loss
from margin_jax.losses import hard_mining_loss as hard_mining_loss
from margin_jax.losses import margin_logits as margin_logits
from margin_jax.losses import margin_softmax_loss as margin_softmax_loss
from margin_jax.losses import mv_softmax_loss as mv_softmax_loss
from margin_jax.losses import normface_loss as normface_loss
from margin_jax.losses import softmax_loss as softmax_loss
from margin_jax.losses import sphereface_loss as sphereface_loss
from margin_jax.losses import sv_softmax_loss as sv_softmax_loss
from margin_jax.margins import arcface_target as arcface_target
from margin_jax.margins import chebyshev_cos as chebyshev_cos
from margin_jax.margins import chebyshev_sin as chebyshev_sin
from margin_jax.margins import combined_target as combined_target
from margin_jax.margins import cosface_target as cosface_target
from margin_jax.margins import eqm_target as eqm_target
from margin_jax.margins import normface_target as normface_target
from margin_jax.margins import sphereface_lambda as sphereface_lambda
from margin_jax.margins import sphereface_psi as sphereface_psi
from margin_jax.margins import sphereface_target as sphereface_target
from margin_jax.margins import straight_through as straight_through
from margin_jax.masks import curricular_non_target as curricular_non_target
from margin_jax.masks import eqm_non_target as eqm_non_target
from margin_jax.masks import focal_weight as focal_weight
from margin_jax.masks import focal_weight_from_ce as focal_weight_from_ce
from margin_jax.masks import hard_mining_mask as hard_mining_mask
from margin_jax.masks import mv_non_target as mv_non_target
from margin_jax.masks import support_vector_mask as support_vector_mask
from margin_jax.masks import sv_non_target as sv_non_target
from margin_jax.pairs import contrastive_loss as contrastive_loss
from margin_jax.pairs import mine_batch_all as mine_batch_all
from margin_jax.pairs import mine_batch_hard as mine_batch_hard
from margin_jax.pairs import mine_semi_hard as mine_semi_hard
from margin_jax.pairs import negative_mask as negative_mask
from margin_jax.pairs import npair_loss as npair_loss
from margin_jax.pairs import pairwise_distances as pairwise_distances
from margin_jax.pairs import positive_mask as positive_mask
from margin_jax.pairs import triplet_loss as triplet_loss
from margin_jax.pairs import triplet_loss_with_stats as triplet_loss_with_stats
from margin_jax.pairs import two_head_loss as two_head_loss

__version__ = "0.1.0"
