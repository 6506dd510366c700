"""Data: image loading, MVTec AD / synthetic / folder samples, CutPaste, and Lightning data modules."""

from patchae.data.cutpaste import CutPaste
from patchae.data.datamodule import (
    AnomalyDataModule,
    AnomalyImageDataset,
    FolderDataModule,
    MVTecDataModule,
    PublicDataModule,
    SyntheticDataModule,
)
from patchae.data.datasets import DATASETS
from patchae.data.datasets.folder import folder_samples
from patchae.data.datasets.mvtec import GRAYSCALE_CATEGORIES, MVTEC_CATEGORIES, mvtec_samples
from patchae.data.download import download_dataset, download_mvtec
from patchae.data.images import IMAGE_EXTENSIONS, load_mask, load_rgb
from patchae.data.samples import Sample
from patchae.data.transforms import ImageTransform
from patchae.settings import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "GRAYSCALE_CATEGORIES",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MVTEC_CATEGORIES",
    "AnomalyDataModule",
    "DATASETS",
    "AnomalyImageDataset",
    "CutPaste",
    "FolderDataModule",
    "ImageTransform",
    "MVTecDataModule",
    "PublicDataModule",
    "Sample",
    "SyntheticDataModule",
    "download_dataset",
    "download_mvtec",
    "folder_samples",
    "generate_synthetic_category",
    "load_mask",
    "load_rgb",
    "mvtec_samples",
]


def __getattr__(name: str) -> object:
    # Imported lazily so `python -m patchae.data.synthetic` does not find its module already imported.
    if name == "generate_synthetic_category":
        from patchae.data.synthetic import generate_synthetic_category

        return generate_synthetic_category
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
