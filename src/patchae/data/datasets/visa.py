"""VisA (Amazon, Zou et al. 2022) through its official split file ``split_csv/1cls.csv``.

Layout: ``<root>/split_csv/1cls.csv`` with columns ``object,split,label,image,mask`` (label ``normal`` or
``anomaly``; paths relative to the root, e.g. ``candle/Data/Images/Anomaly/000.JPG`` and
``candle/Data/Masks/Anomaly/000.png``). Mask values are defect ids: every non-zero pixel is defect.
"""

from __future__ import annotations

import csv
from pathlib import Path

from patchae.data.datasets.spec import DatasetSpec
from patchae.data.download import DatasetSource
from patchae.data.samples import GOOD, Sample
from patchae.errors import PatchAEError

# URL and SHA-256 as published with anomalib's Visa datamodule (DOWNLOAD_INFO, hashsum).
SOURCE = DatasetSource(
    name="VisA",
    url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
    sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
    homepage="https://github.com/amazon-science/spot-diff",
    license="CC BY 4.0",
    wrappers=("VisA_20220922", "VisA"),
    keep=("split_csv", "LICENSE-DATASET", "README.md"),
)
CATEGORIES: tuple[str, ...] = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}


def visa_samples(root: Path, category: str, split: str) -> list[Sample]:
    rows = [row for row in _read_split_file(root) if row["object"] == category and row["split"] == split]
    if not rows:
        raise PatchAEError(
            f"{root / SPLIT_CSV} lists no {split} images of {category!r}; re-extract the VisA archive"
        )
    return [_sample(root, row) for row in rows]


def _read_split_file(root: Path) -> list[dict[str, str]]:
    path = root / SPLIT_CSV
    if not path.is_file():
        raise PatchAEError(
            f"VisA split file {path} not found; data.root must be the extracted VisA folder (with split_csv/)"
        )
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise PatchAEError(
                f"{path} lacks the column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}"
            )
        return [{key: (value or "").strip() for key, value in row.items() if key} for row in reader]


def _sample(root: Path, row: dict[str, str]) -> Sample:
    if row["label"] not in LABELS:
        raise PatchAEError(
            f"{root / SPLIT_CSV}: label {row['label']!r} of {row['image']} is not normal or anomaly"
        )
    label = LABELS[row["label"]]
    if row["split"] == "train" and label == 1:
        raise PatchAEError(
            f"{root / SPLIT_CSV} puts the anomaly {row['image']} in the train split; use 1cls.csv"
        )
    image = _listed_file(root, row["image"])
    if label == 0:
        return Sample(image, 0, None, GOOD)
    mask = _listed_file(root, row["mask"]) if row["mask"] else None
    return Sample(image, 1, mask, "anomaly", mask_nonzero=True)


def _listed_file(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise PatchAEError(f"{path}, listed in {root / SPLIT_CSV}, is missing; re-extract the VisA archive")
    return path


SPEC = DatasetSpec(
    key="visa",
    source=SOURCE,
    categories=CATEGORIES,
    list_samples=visa_samples,
    marker=lambda root, category: root / category,
)
