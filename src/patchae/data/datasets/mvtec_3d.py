"""MVTec 3D-AD, RGB images only (the xyz point clouds are ignored).

Layout per category: ``{train,validation,test}/<type>/{rgb,xyz,gt}/NNN.{png,tiff}``; training images are
``train/good/rgb/*.png``, test images ``test/<type>/rgb/*.png`` (``good`` = normal) with masks
``test/<type>/gt/<stem>.png``. ``validation/good`` is not used (the framework holds out its own share).
"""

from __future__ import annotations

from pathlib import Path

from patchae.data.datasets.spec import DatasetSpec, category_dir, images_in, mask_with_stem, missing_mask
from patchae.data.download import DatasetSource
from patchae.data.samples import GOOD, Sample

# URL as used by anomalib's MVTec3D datamodule. Its published checksum is an MD5
# (d8bb2800fbf3ac88e798da6ae10dc819), no SHA-256 is known with certainty: downloading refuses until
# data.sha256 is set from a copy you trust.
SOURCE = DatasetSource(
    name="MVTec 3D-AD",
    url=(
        "https://www.mydrive.ch/shares/45920/dd1eb345346df066c63b5c95676b961b/download/428824485-1643285832"
        "/mvtec_3d_anomaly_detection.tar.xz"
    ),
    sha256=None,
    homepage="https://www.mvtec.com/company/research/datasets/mvtec-3d-ad",
    license="CC BY-NC-SA 4.0",
    wrappers=("mvtec_3d_anomaly_detection",),
)
CATEGORIES: tuple[str, ...] = (
    "bagel",
    "cable_gland",
    "carrot",
    "cookie",
    "dowel",
    "foam",
    "peach",
    "potato",
    "rope",
    "tire",
)


def mvtec_3d_samples(root: Path, category: str, split: str) -> list[Sample]:
    folder = category_dir(SOURCE, root, category)
    if split == "train":
        return [Sample(path, 0, None, GOOD) for path in images_in(SOURCE, folder / "train" / GOOD / "rgb")]
    test_dir = folder / "test"
    types = sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
    samples = [Sample(path, 0, None, GOOD) for path in images_in(SOURCE, test_dir / GOOD / "rgb")]
    for defect in (t for t in types if t != GOOD):
        for image in images_in(SOURCE, test_dir / defect / "rgb"):
            mask = mask_with_stem(test_dir / defect / "gt", image.stem)
            if mask is None:
                raise missing_mask(SOURCE, image, test_dir / defect / "gt" / f"{image.stem}.png")
            samples.append(Sample(image, 1, mask, defect))
    return samples


SPEC = DatasetSpec(
    key="mvtec_3d",
    source=SOURCE,
    categories=CATEGORIES,
    list_samples=mvtec_3d_samples,
    marker=lambda root, category: root / category,
)
