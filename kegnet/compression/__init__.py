"""Tucker-2 / SVD compression: rank selection (EVBMF, fraction, explicit, target ratio) and layer surgery."""

from kegnet.compression.evbmf import evbmf_rank
from kegnet.compression.layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d
from kegnet.compression.plan import CompressionPlan, LayerPlan, apply_plan, plan_compression, select_layers

__all__ = [
    "CompressionPlan", "LayerPlan", "LowRankConv1x1", "LowRankLinear", "Tucker2Conv2d",
    "apply_plan", "evbmf_rank", "plan_compression", "select_layers",
]
