"""MVTec LOCO AD (logical and structural anomalies).

Layout per category: ``train/good``, ``validation/good``, ``test/{good,logical_anomalies,
structural_anomalies}`` with ``NNN.png`` images, and ``ground_truth/<type>/<image stem>/000.png`` (one file
per defect, several per image possible: their union is the image's mask). Mask values are defect ids
(``pixel_value`` in ``defects_config.json``): every non-zero pixel is defect. ``validation/good`` is not used:
the framework holds out its own share of ``train/good``.
"""

from __future__ import annotations

from pathlib import Path

from patchae.data.datasets.spec import DatasetSpec, category_dir, images_in, missing_mask
from patchae.data.download import DatasetSource
from patchae.data.samples import GOOD, Sample, list_images

# URL and SHA-256 as published with anomalib's MVTecLOCO dataset (DOWNLOAD_INFO, hashsum).
SOURCE = DatasetSource(
    name="MVTec LOCO AD",
    url=(
        "https://www.mydrive.ch/shares/48237/1b9106ccdfbb09a0c414bd49fe44a14a/download/430647091-1646842701"
        "/mvtec_loco_anomaly_detection.tar.xz"
    ),
    sha256="9e7c84dba550fd2e59d8e9e231c929c45ba737b6b6a6d3814100f54d63aae687",
    homepage="https://www.mvtec.com/company/research/datasets/mvtec-loco",
    license="CC BY-NC-SA 4.0",
    wrappers=("mvtec_loco_anomaly_detection",),
)
CATEGORIES: tuple[str, ...] = (
    "breakfast_box",
    "juice_bottle",
    "pushpins",
    "screw_bag",
    "splicing_connectors",
)
DEFECT_TYPES: tuple[str, ...] = ("logical_anomalies", "structural_anomalies")


def loco_samples(root: Path, category: str, split: str) -> list[Sample]:
    folder = category_dir(SOURCE, root, category)
    if split == "train":
        return [Sample(path, 0, None, GOOD) for path in images_in(SOURCE, folder / "train" / GOOD)]
    samples = [Sample(path, 0, None, GOOD) for path in images_in(SOURCE, folder / "test" / GOOD)]
    for defect in DEFECT_TYPES:
        for image in images_in(SOURCE, folder / "test" / defect):
            masks = _masks(folder / "ground_truth" / defect / image.stem, image)
            samples.append(Sample(image, 1, masks[0], defect, tuple(masks[1:]), mask_nonzero=True))
    return samples


def _masks(mask_dir: Path, image: Path) -> list[Path]:
    masks = list_images(mask_dir) if mask_dir.is_dir() else []
    if not masks:
        raise missing_mask(SOURCE, image, mask_dir / "000.png")
    return masks


SPEC = DatasetSpec(
    key="mvtec_loco",
    source=SOURCE,
    categories=CATEGORIES,
    list_samples=loco_samples,
    marker=lambda root, category: root / category,
)
