"""Neural networks: the paper's RHM U-Net and its μP parameterisation (docs/unet.md), and the
MD4-style text transformer (docs/text.md)."""

from cgtools.models.mup import ParamInfo, param_groups, raw_learning_rates
from cgtools.models.transformer import TransformerConfig, TransformerDenoiser
from cgtools.models.unet import (
    PAPER_WIDTH,
    UNet,
    UNetConfig,
    flops_forward,
    flops_per_step,
    reference_leaf_standardisation,
)

__all__ = ["PAPER_WIDTH", "ParamInfo", "TransformerConfig", "TransformerDenoiser", "UNet", "UNetConfig",
           "flops_forward", "flops_per_step", "param_groups", "raw_learning_rates", "reference_leaf_standardisation"]
