"""Data sets for MMSegmentation: the shapes data in its Pascal VOC layout, and VOC 2012 with SBD when present."""

import logging
import os.path as osp
from typing import List

import mmengine
from mmengine.logging import print_log
from mmseg.datasets import BaseSegDataset, PascalVOCDataset
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


@DATASETS.register_module()
class VOCAugDataset(PascalVOCDataset):
    """Pascal VOC 2012 ``train``, plus the SBD augmented set (10,582 images in all) when it is there.

    MMSeg's ``pascal_voc12_aug`` config concatenates two data sets and fails
    when ``SegmentationClassAug`` is absent; this one reads ``ann_file`` from
    ``SegmentationClass`` and adds every image of ``aug_ann_file`` that is not
    already in it, with its mask from ``aug_seg_map_path``, if both exist
    (the layout MMSeg's ``tools/dataset_converters/voc_aug.py`` writes). It logs
    which of the two it trains on, so a run on 1,464 images is not mistaken
    for one on 10,582.
    """

    def __init__(
        self,
        ann_file: str = "ImageSets/Segmentation/train.txt",
        aug_ann_file: str = "ImageSets/Segmentation/aug.txt",
        aug_seg_map_path: str = "SegmentationClassAug",
        **kwargs,
    ) -> None:
        self.aug_ann_file = aug_ann_file
        self.aug_seg_map_path = aug_seg_map_path
        super().__init__(ann_file=ann_file, **kwargs)

    def _under_root(self, path: str) -> str:
        return path if osp.isabs(path) or not self.data_root else osp.join(self.data_root, path)

    def load_data_list(self) -> List[dict]:
        data_list = super().load_data_list()
        aug_ann, aug_dir = self._under_root(self.aug_ann_file), self._under_root(self.aug_seg_map_path)
        if not (osp.isfile(aug_ann) and osp.isdir(aug_dir)):
            print_log(
                f"VOCAugDataset: no augmented set ({aug_ann} and {aug_dir}); training on the "
                f"{len(data_list)} images of {self.ann_file} only",
                logger="current", level=logging.WARNING,
            )
            return data_list
        seen = {info["img_path"] for info in data_list}
        img_dir = self.data_prefix["img_path"]
        added = 0
        for name in mmengine.list_from_file(aug_ann, backend_args=self.backend_args):
            img_path = osp.join(img_dir, name.strip() + self.img_suffix)
            if not name.strip() or img_path in seen:
                continue
            seen.add(img_path)
            data_list.append(dict(
                img_path=img_path,
                seg_map_path=osp.join(aug_dir, name.strip() + self.seg_map_suffix),
                label_map=self.label_map,
                reduce_zero_label=self.reduce_zero_label,
                seg_fields=[],
            ))
            added += 1
        print_log(f"VOCAugDataset: {len(data_list) - added} images of {self.ann_file} + {added} from {aug_ann}",
                  logger="current", level=logging.INFO)
        return data_list
