"""The C4 box head of MoCo's detection recipe: Detectron2's Res5ROIHeads with a norm after res5."""

from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads

from .config import check_config


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads whose res5 ends in ``MODEL.RESNETS.NORM``.

    MoCo (He et al., 2020, Sec. 4.2, "Feature normalization") fine-tunes with
    trained, synchronised BN because self-supervised features are scaled
    differently from supervised ones; its C4 detection code also normalises
    the res5 output. The norm is a new layer (``roi_heads.res5.norm``), so a
    converted backbone never holds it.
    """

    @classmethod
    def from_config(cls, cfg, input_shape):
        check_config(cfg)  # refuse ResNet-18/34 and timm backbones here too, for code that skips train_net
        return super().from_config(cfg, input_shape)

    @classmethod
    def _build_res5_block(cls, cfg):
        res5, out_channels = super()._build_res5_block(cfg)
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return res5, out_channels
