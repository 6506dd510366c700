"""KolektorSDD2 (Kolektor Surface-Defect Dataset 2).

Layout: ``<root>/{train,test}/NNNNN.png`` with its mask ``NNNNN_GT.png`` next to it; a non-zero mask pixel is
defect and the label comes from the mask (an all-zero mask = normal image). Training uses the normal images of
``train/`` only (the defective ones are left out: the models learn from normal images); testing uses all of
``test/``.
"""

from __future__ import annotations

from pathlib import Path

from patchae.data.datasets.spec import DatasetSpec, existing_root, images_in
from patchae.data.download import DatasetSource
from patchae.data.images import load_mask
from patchae.data.samples import GOOD, Sample
from patchae.errors import PatchAEError

# The authors' link (a redirect to the zip). No SHA-256 is known with certainty: downloading refuses until
# data.sha256 is set from a copy you trust. Licence as stated on the data set page.
SOURCE = DatasetSource(
    name="KolektorSDD2",
    url="https://go.vicos.si/kolektorsdd2",
    sha256=None,
    homepage="https://www.vicos.si/resources/kolektorsdd2/",
    license="CC BY-NC-SA 4.0",
    wrappers=("KolektorSDD2",),
)
MASK_SUFFIX = "_GT"
DEFECT = "defect"


def ksdd2_samples(root: Path, category: str, split: str) -> list[Sample]:
    folder = existing_root(SOURCE, root) / split
    images = [p for p in images_in(SOURCE, folder) if not p.stem.endswith(MASK_SUFFIX)]
    samples = [_sample(image) for image in images]
    if split == "train":
        samples = [s for s in samples if s.label == 0]
        if not samples:
            raise PatchAEError(f"{folder} has no normal image (all masks mark defects); check data.root")
    return samples


def _sample(image: Path) -> Sample:
    mask = image.with_name(f"{image.stem}{MASK_SUFFIX}.png")
    if not mask.is_file():
        raise PatchAEError(f"KolektorSDD2 image {image} has no mask {mask}; re-extract the archive")
    if load_mask(mask, nonzero=True).getbbox() is None:
        return Sample(image, 0, None, GOOD)
    return Sample(image, 1, mask, DEFECT, mask_nonzero=True)


SPEC = DatasetSpec(
    key="ksdd2",
    source=SOURCE,
    categories=(),
    list_samples=ksdd2_samples,
    marker=lambda root, category: root / "train",
)
