"""Install both packages: ``retro_transfer`` (library) and ``distill`` (distillation stage).

PyTorch is a range, not a pin, so a user's own CUDA build keeps working; the
project's ``make setup`` installs the tested pair first. Versions are pinned
only where a newer release is known to break (see ../shared/DEPENDENCIES.md):
mmcv-lite 2.2 fails mmseg's version check, and setuptools 81 removed the
``pkg_resources`` that mmengine and Detectron2's model zoo import.
"""

from setuptools import find_packages, setup

D2_REQUIRES = [
    # Detectron2 itself is not on PyPI; tools/install_detectron2.py installs it.
    # These are the upstream requirements its repackaged wheel dropped.
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "pycocotools>=2.0.6",
]
MMSEG_REQUIRES = [
    "setuptools<81",
    "mmengine==0.10.7",
    "mmcv-lite==2.1.0",
    "mmsegmentation==1.2.2",
    "ftfy",
    "regex",
]
# MMDetection 3.3.0 is the release that accepts mmcv < 2.2 (so mmcv-lite 2.1.0, which mmseg
# needs) and mmengine 0.10; it is pure Python. Its compiled-op imports are served by
# retro_transfer/compat (nms, RoIAlign... on torchvision).
MMDET_REQUIRES = MMSEG_REQUIRES + ["mmdet==3.3.0"]
# tools/export.py --format onnx: torch's exporter (dynamo=True) needs onnxscript,
# and onnxruntime checks the exported graph against PyTorch. Lower bounds are
# the versions tested.
EXPORT_REQUIRES = ["onnx>=1.23", "onnxscript>=0.7", "onnxruntime>=1.32"]
DEV_REQUIRES = ["pytest>=7", "pytest-timeout"]

setup(
    name="retro-transfer",
    version="0.1.0",
    description="Self-supervised distillation of small backbones (Retro, DisCo, SEED, MoCo v2) and transfer to Detectron2 / MMSegmentation / MMDetection",
    packages=find_packages(include=["retro_transfer", "retro_transfer.*", "distill", "distill.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=1.0,<2",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "d2": D2_REQUIRES,
        "mmseg": MMSEG_REQUIRES,
        "mmdet": MMDET_REQUIRES,
        "export": EXPORT_REQUIRES,
        "dev": DEV_REQUIRES,
        "all": D2_REQUIRES + MMDET_REQUIRES + EXPORT_REQUIRES + DEV_REQUIRES,
    },
)
