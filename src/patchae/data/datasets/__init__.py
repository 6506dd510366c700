"""Public anomaly detection data sets in their official layouts, and the data module that serves them.

Each module turns one layout into :class:`~patchae.data.samples.Sample` lists; everything after that (the
transform, hold-out, validation and loaders) is :class:`~patchae.data.datamodule.AnomalyDataModule`'s.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from patchae.data.datamodule import AnomalyDataModule
from patchae.data.datasets import btad, ksdd2, mpdd, mvtec_3d, mvtec_loco, visa
from patchae.data.datasets.spec import DatasetSpec
from patchae.data.download import download_dataset
from patchae.data.samples import Sample
from patchae.errors import PatchAEError

DATASETS: dict[str, DatasetSpec] = {
    module.SPEC.key: module.SPEC for module in (visa, mvtec_loco, mvtec_3d, btad, mpdd, ksdd2)
}


def dataset_spec(key: str) -> DatasetSpec:
    if key not in DATASETS:
        raise PatchAEError(f"unknown data set {key!r}; use one of {', '.join(DATASETS)}")
    return DATASETS[key]


class PublicDataModule(AnomalyDataModule):
    """One category of a public data set (``dataset``: a key of :data:`DATASETS`) under ``root``.

    ``download`` fetches the archive when the category is missing; ``url`` and ``sha256`` replace the known
    ones (None keeps them). A data set without a known SHA-256 is downloaded only once ``sha256`` is set.
    """

    def __init__(
        self,
        dataset: str,
        root: str | Path,
        category: str,
        download: bool = False,
        url: str | None = None,
        sha256: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.spec = dataset_spec(dataset)
        super().__init__(root, self.spec.canonical(str(category)), **kwargs)
        self.download = bool(download)
        source = self.spec.source
        self.source = dataclasses.replace(source, url=url or source.url, sha256=sha256 or source.sha256)

    def prepare_data(self) -> None:
        if self.download and not self.spec.is_present(self.root, self.category):
            self.spec.check_category(self.category)  # before a download of gigabytes, not after it
            download_dataset(self.source, self.root, only=self.category if self.spec.categories else None)

    def samples(self, split: str) -> list[Sample]:
        return self.spec.samples(self.root, self.category, split)


__all__ = ["DATASETS", "DatasetSpec", "PublicDataModule", "dataset_spec"]
