"""Neural network modules: face backbone, ID Q-Former, IP-Adapter image projection."""

from uniportrait.models._loading import load_state_dict_strict
from uniportrait.models.face_backbone import (
    IR_VARIANTS,
    IRBackbone,
    IRBackboneConfig,
    IRBackboneOutput,
    intrinsic_tokens,
    load_tface_state_dict,
    structure_backbone_tokens,
)
from uniportrait.models.image_proj import ImageProjection, ImageProjectionConfig
from uniportrait.models.qformer import IDQFormer, QFormerConfig, drop_structure_tokens

__all__ = [
    "IR_VARIANTS",
    "IDQFormer",
    "IRBackbone",
    "IRBackboneConfig",
    "IRBackboneOutput",
    "ImageProjection",
    "ImageProjectionConfig",
    "QFormerConfig",
    "drop_structure_tokens",
    "intrinsic_tokens",
    "load_state_dict_strict",
    "load_tface_state_dict",
    "structure_backbone_tokens",
]
