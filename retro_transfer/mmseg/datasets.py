"""The shapes data set for MMSegmentation, read from its Pascal VOC layout."""

from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from retro_transfer.data.shapes import CLASSES, voc_palette

_PALETTE = voc_palette(len(CLASSES) + 1)


@DATASETS.register_module()
class ShapesVOCDataset(BaseSegDataset):
    """``VOC2007/`` of a shapes data set: JPEGImages + SegmentationClass, 255 = void.

    MMSeg's own ``PascalVOCDataset`` reads the same layout but fixes the 21 VOC
    class names (a class subset is all it lets a config choose), so the shapes
    classes need a data set of their own. Pass ``ann_file`` as
    ``ImageSets/Segmentation/{train,val,trainval}.txt``.
    """

    METAINFO = dict(
        classes=("background",) + CLASSES,
        palette=[_PALETTE[i : i + 3] for i in range(0, 3 * (len(CLASSES) + 1), 3)],
    )

    def __init__(self, ann_file: str, img_suffix: str = ".jpg", seg_map_suffix: str = ".png", **kwargs) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, ann_file=ann_file, **kwargs)
