"""MPDD, the Metal Parts Defect Detection data set: the MVTec AD layout, 6 categories.

``<category>/{train/good,test/<defect>,ground_truth/<defect>/<stem>_mask.png}``, read by the MVTec AD lister.
"""

from __future__ import annotations

from pathlib import Path

from patchae.data.datasets.mvtec import mvtec_samples
from patchae.data.datasets.spec import DatasetSpec, category_dir
from patchae.data.download import DatasetSource
from patchae.data.samples import Sample

# The authors share MPDD through a link on their repository page only (no direct, stable archive URL and no
# published checksum): download it by hand. The licence is the one the authors state (CC BY-NC-SA 4.0; not
# verified against the archive here).
SOURCE = DatasetSource(
    name="MPDD",
    url=None,
    sha256=None,
    homepage="https://github.com/stepanje/MPDD",
    license="CC BY-NC-SA 4.0",
    wrappers=("MPDD",),
)
CATEGORIES: tuple[str, ...] = (
    "bracket_black",
    "bracket_brown",
    "bracket_white",
    "connector",
    "metal_plate",
    "tubes",
)


def mpdd_samples(root: Path, category: str, split: str) -> list[Sample]:
    category_dir(SOURCE, root, category)  # the MPDD wording for a missing category
    return mvtec_samples(root, category, split)


SPEC = DatasetSpec(
    key="mpdd",
    source=SOURCE,
    categories=CATEGORIES,
    list_samples=mpdd_samples,
    marker=lambda root, category: root / category,
)
