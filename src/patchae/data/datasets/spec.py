"""What every public data set module provides, and the checks they share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from patchae.data.download import DatasetSource
from patchae.data.images import IMAGE_EXTENSIONS
from patchae.data.samples import Sample, check_split, list_images
from patchae.errors import PatchAEError


@dataclass(frozen=True)
class DatasetSpec:
    """A public data set: its source, its categories and how its official layout becomes samples.

    ``categories`` empty means one set of images (KolektorSDD2): the category then only names the run.
    ``list_samples(root, category, split)`` lists a split; ``marker(root, category)`` is a path that exists
    once the category is in place (what ``data.download`` checks before downloading); ``canonical`` maps a
    category as typed on the command line to its folder name.
    """

    key: str
    source: DatasetSource
    categories: tuple[str, ...]
    list_samples: Callable[[Path, str, str], list[Sample]]
    marker: Callable[[Path, str], Path]
    canonical: Callable[[str], str] = str  # the category's folder name for a name as typed (BTAD: 1 -> 01)

    def check_category(self, category: str) -> None:
        if self.categories and category not in self.categories:
            raise PatchAEError(
                f"unknown {self.source.name} category {category!r}; use one of {', '.join(self.categories)}"
            )

    def is_present(self, root: Path, category: str) -> bool:
        return self.marker(root, category).exists()

    def samples(self, root: str | Path, category: str, split: str) -> list[Sample]:
        check_split(split)
        self.check_category(category)
        return self.list_samples(existing_root(self.source, root), category, split)


def existing_root(source: DatasetSource, root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise PatchAEError(
            f"{source.name} root {root} not found; set data.root=<folder of the extracted archive> "
            "or data.download=true"
        )
    return root


def category_dir(source: DatasetSource, root: Path, category: str) -> Path:
    folder = root / category
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise PatchAEError(
            f"{source.name} category {category!r} not found in {root} (folders found: "
            f"{', '.join(found) or 'none'}); set data.download=true or point data.root at the extracted archive"
        )
    return folder


def images_in(source: DatasetSource, folder: Path) -> list[Path]:
    """The images directly in ``folder``; a missing or empty folder is an error naming the layout."""
    images = list_images(folder) if folder.is_dir() else []
    if not images:
        raise PatchAEError(
            f"no images in {folder}; the {source.name} layout needs it: re-extract the archive or fix data.root"
        )
    return images


def mask_with_stem(folder: Path, stem: str) -> Path | None:
    """``folder/<stem>.<any image extension>``, or None."""
    for extension in IMAGE_EXTENSIONS:
        candidate = folder / f"{stem}{extension}"
        if candidate.is_file():
            return candidate
    return None


def missing_mask(source: DatasetSource, image: Path, expected: Path) -> PatchAEError:
    return PatchAEError(
        f"{source.name} defect image {image} has no mask (expected {expected}); re-extract the archive"
    )
