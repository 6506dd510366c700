"""Every data set's layout in one place: MVTec AD (:mod:`.mvtec`), the user's folders (:mod:`.folder`) and the
public data sets in their official layouts (the registry :data:`DATASETS`).

Each module turns one layout into :class:`~patchae.data.samples.Sample` lists; everything after that (the
transform, hold-out, validation and loaders) is :class:`~patchae.data.datamodule.AnomalyDataModule`'s.
"""

from __future__ import annotations

from patchae.data.datasets import btad, ksdd2, mpdd, mvtec_3d, mvtec_loco, visa
from patchae.data.datasets.spec import DatasetSpec
from patchae.errors import PatchAEError

DATASETS: dict[str, DatasetSpec] = {
    module.SPEC.key: module.SPEC for module in (visa, mvtec_loco, mvtec_3d, btad, mpdd, ksdd2)
}


def dataset_spec(key: str) -> DatasetSpec:
    if key not in DATASETS:
        raise PatchAEError(f"unknown data set {key!r}; use one of {', '.join(DATASETS)}")
    return DATASETS[key]


__all__ = ["DATASETS", "DatasetSpec", "dataset_spec"]
