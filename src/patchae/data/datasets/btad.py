"""BTAD, the BeanTech Anomaly Detection data set (products 01, 02, 03).

Layout per product: ``train/ok``, ``test/{ok,ko}`` and ``ground_truth/ko/<image stem>.<ext>``. Extensions
differ by product (images ``.bmp`` or ``.png``; product 03's masks are ``.bmp``, the others' ``.png``), so an
image's mask is found by its stem, whatever the extension.
"""

from __future__ import annotations

from pathlib import Path

from patchae.data.datasets.spec import DatasetSpec, category_dir, images_in, mask_with_stem, missing_mask
from patchae.data.download import DatasetSource
from patchae.data.samples import GOOD, Sample

# URL and SHA-256 as published with anomalib's BTech datamodule (DOWNLOAD_INFO, hashsum). The licence is the
# one stated by the data set's authors (VT-ADL repository): CC BY-SA 4.0.
SOURCE = DatasetSource(
    name="BTAD",
    url="https://avires.dimi.uniud.it/papers/btad/btad.zip",
    sha256="461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
    homepage="https://github.com/pankajmishra000/VT-ADL",
    license="CC BY-SA 4.0",
    wrappers=("BTech_Dataset_transformed",),
    keep=(),
)
CATEGORIES: tuple[str, ...] = ("01", "02", "03")
DEFECT = "ko"


def btad_samples(root: Path, category: str, split: str) -> list[Sample]:
    folder = category_dir(SOURCE, root, category)
    if split == "train":
        return [Sample(path, 0, None, GOOD) for path in images_in(SOURCE, folder / "train" / "ok")]
    samples = [Sample(path, 0, None, GOOD) for path in images_in(SOURCE, folder / "test" / "ok")]
    mask_dir = folder / "ground_truth" / DEFECT
    for image in images_in(SOURCE, folder / "test" / DEFECT):
        mask = mask_with_stem(mask_dir, image.stem)
        if mask is None:
            raise missing_mask(SOURCE, image, mask_dir / f"{image.stem}.png")
        samples.append(Sample(image, 1, mask, DEFECT))
    return samples


SPEC = DatasetSpec(
    key="btad",
    source=SOURCE,
    categories=CATEGORIES,
    list_samples=btad_samples,
    marker=lambda root, category: root / category,
    canonical=lambda category: category.zfill(2) if category.isdigit() else category,  # category=1 or 01
)
