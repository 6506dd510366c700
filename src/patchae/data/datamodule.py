"""Lightning data modules: MVTec AD, the public data sets, the synthetic category, and the user's own folders."""

from __future__ import annotations

import dataclasses
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from patchae.data.cache import DecodedImages, cache_bytes
from patchae.data.corruption import PLACEMENTS, Corruption, checked_choices, foreground_mask
from patchae.data.cutpaste import CutPaste
from patchae.data.datasets import dataset_spec
from patchae.data.datasets.folder import folder_samples
from patchae.data.datasets.mvtec import MVTEC_CATEGORIES, mvtec_samples
from patchae.data.download import download_dataset, download_mvtec
from patchae.data.geometry import choose_geometry, image_sizes
from patchae.data.images import load_rgb
from patchae.data.perlin import PerlinBlend
from patchae.data.samples import Sample, check_split, load_sample_mask
from patchae.data.transforms import RESIZE_MODES, ImageTransform
from patchae.errors import PatchAEError
from patchae.settings import IMAGENET_MEAN, IMAGENET_STD
from patchae.tiling import Tiling, random_tile

logger = logging.getLogger(__name__)

ON_OBJECT_SHARE = 0.5  # foreground placement: least share of a defect's changed pixels that lie on the object
ON_OBJECT_TRIES = (
    20  # draws before a defect that misses the object (or a warp that changes nothing) is kept anyway
)
VAL_KINDS = ("cutpaste", "perlin", "warp")  # validation's synthetic defects (validation.kinds)


def seeded_generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from ``keys`` (well mixed: nearby keys give unrelated streams)."""
    state = np.random.SeedSequence([int(key) for key in keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


class AnomalyImageDataset(Dataset):
    """Loads samples into dicts with ``image``, ``mask``, ``label``, ``has_mask``, ``path``, ``defect_type``.

    With ``augment`` the CutPaste defect is drawn with a generator seeded from ``(seed, epoch, index)``, so
    an item is the same whichever worker loads it and runs are reproducible; call :meth:`set_epoch` (the
    train sampler does it) to get fresh defects every epoch. The epoch lives in shared memory so persistent
    workers see the update.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: ImageTransform,
        augment: CutPaste | None = None,
        seed: int = 0,
        tile: int | None = None,
        decoded: DecodedImages | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.augment = augment
        self.seed = int(seed)
        self.tile = tile  # with data.tiling, training items are one random tile of each image
        if decoded is not None and len(decoded) != len(self.samples):
            raise ValueError("the decoded images must be those of the samples, in order")
        self.decoded = decoded  # the samples' images decoded once (data.cache_mb), else read every time
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def item_generator(self, index: int) -> torch.Generator:
        """The generator that drives the augmentation of item ``index`` in the current epoch."""
        return seeded_generator(self.seed, self.epoch, index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        if self.decoded is not None:
            pixels, original = self.decoded[index]
        else:
            picture = load_rgb(sample.path)
            pixels, original = self.transform.placed_pixels(picture), (picture.height, picture.width)
        image = self.transform.unit(pixels)
        if sample.mask_path is not None:
            mask_image = load_sample_mask(sample)
            check_mask_size(mask_image.size, (original[1], original[0]), sample)
            mask = self.transform.mask(mask_image)
        else:
            mask = torch.zeros((1, *self.transform.output_shape), dtype=torch.float32)
        label, has_mask = sample.label, sample.has_pixel_labels
        if self.tile is not None:
            generator = seeded_generator(self.seed, self.epoch, index, 1)
            image, mask = random_tile(image, mask, self.tile, generator)
        if self.augment is not None:
            image, pasted = self.augment(image, generator=self.item_generator(index))
            if bool(pasted.any()):
                mask, label = torch.maximum(mask, pasted), 1
        return {
            "image": self.transform.normalize(image),
            "mask": mask,
            "label": torch.tensor(label, dtype=torch.int64),
            "has_mask": torch.tensor(has_mask, dtype=torch.bool),
            "path": str(sample.path),
            "defect_type": sample.defect_type,
            "index": torch.tensor(index),  # under DDP, to drop the sampler's repeated items when gathering
            **geometry(self.transform, original),
        }


def geometry(transform: ImageTransform, original: tuple[int, int]) -> dict[str, torch.Tensor]:
    """An item's ``original_size`` (H, W) and ``content_box`` (top, left, bottom, right: the input pixels that
    show the image, not padding), with which maps go back to the original image and metrics skip padding."""
    return {
        "original_size": torch.tensor(original),
        "content_box": torch.tensor(transform.content_box(original)),
    }


def check_mask_size(mask_size: tuple[int, int], image_size: tuple[int, int], sample: Sample) -> None:
    """A mask must cover its image: same size, or a scaled copy (same aspect ratio within 1 %, resized along)."""
    if mask_size == image_size:
        return
    (mask_w, mask_h), (image_w, image_h) = mask_size, image_size
    if abs(mask_w / mask_h - image_w / image_h) <= 0.01 * image_w / image_h:
        return
    raise PatchAEError(
        f"mask {sample.mask_path} is {mask_w}x{mask_h} pixels but its image {sample.path} is {image_w}x{image_h}; "
        "masks must match their image (or be a scaled copy of it): fix or remove the mask"
    )


class SyntheticDefectDataset(Dataset):
    """Label-free validation images: each normal image clean, then with ``defects_per_image`` synthetic
    defects of ``kinds`` in turn, each with the exact mask of the pixels it changed: ``cutpaste`` (the kind
    Patch AE trains on), ``perlin`` (a Perlin-shaped blend of another of these images) and ``warp`` (one region
    of the image geometrically distorted: the same material in the wrong shape, as a bent tip or a dented
    thread, where the other two bring in foreign content). The same items every time they are read (seeded by
    image and version), so validations of different epochs compare.

    ``placement="foreground"`` keeps a defect only when at least ``ON_OBJECT_SHARE`` of its changed pixels lie
    on the object (:func:`~patchae.data.corruption.foreground_mask`: pixels unlike the image's border), drawing
    again otherwise: on a small object on a plain background (a screw) uniform placement puts most defects on
    the background, where real defects never are. An image without a foreground keeps its first draw, which
    is what ``"uniform"`` always keeps."""

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: ImageTransform,
        cutpaste: CutPaste,
        perlin: PerlinBlend,
        defects_per_image: int = 2,
        seed: int = 0,
        placement: str = "uniform",
        kinds: Sequence[str] = ("cutpaste", "perlin"),
    ) -> None:
        check_val_placement(placement)
        self.placement = placement
        self.kinds = check_val_kinds(kinds)
        # One region, replaced outright by its warped self, no noise: the corruption's warp fill alone.
        self.warp = Corruption(
            regions=(1, 1), fills=("warp",), opacity=(1.0, 1.0), noise_std=0.0, placement=placement
        )
        self.samples = list(samples)
        self.transform = transform
        self.cutpaste = dataclasses.replace(cutpaste, probability=1.0)
        self.perlin = perlin
        self.versions = 1 + int(defects_per_image)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.samples) * self.versions

    def unit_image(self, index: int) -> torch.Tensor:
        return self.transform.to_unit_tensor(load_rgb(self.samples[index].path))

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_index, version = divmod(index, self.versions)
        picture = load_rgb(self.samples[image_index].path)
        image = self.transform.to_unit_tensor(picture)
        mask = torch.zeros((1, *image.shape[-2:]), dtype=torch.float32)
        kind = "good"
        if version > 0:
            kind = self.kinds[(version - 1) % len(self.kinds)]
            image, mask = self.defect(
                image, image_index, kind, seeded_generator(self.seed, image_index, version)
            )
        return {
            "image": self.transform.normalize(image),
            "mask": mask,
            "label": torch.tensor(int(bool(mask.any())), dtype=torch.int64),
            "has_mask": torch.tensor(True),
            "path": str(self.samples[image_index].path),
            "defect_type": kind,
            "index": torch.tensor(index),
            **geometry(self.transform, (picture.height, picture.width)),
        }

    def defect(
        self, image: torch.Tensor, image_index: int, kind: str, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image`` with one synthetic defect of ``kind`` and its mask, placed as ``placement`` says."""
        source = None
        if kind == "perlin":
            source = self.unit_image((image_index + 1) % len(self.samples)).flip(1, 2)
        on_object = foreground_mask(image) if self.placement == "foreground" else None
        tries = ON_OBJECT_TRIES if on_object is not None and on_object.any() else 1
        for _ in range(tries):
            if kind == "warp":
                defective, mask = self.warped(image, generator)
            elif source is None:
                defective, mask = self.cutpaste(image, generator=generator)
            else:
                defective, mask = self.perlin(image, source, generator)
            changed = mask[0].bool()
            if tries == 1 or on_object[changed].float().mean() >= ON_OBJECT_SHARE:
                break
        return defective, mask

    def warped(self, image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``image`` with one warped region, rounded to the 8-bit grey levels the image came in, so that the
        mask holds exactly the pixels whose stored value changed (a sub-level shift of a flat area is none);
        drawn again while a draw changes nothing (a region on a flat background)."""
        levels = (image * 255).round()
        for _ in range(ON_OBJECT_TRIES):
            warped, _ = self.warp(image, generator=generator)
            warped_levels = (warped * 255).round()
            mask = (warped_levels != levels).any(dim=0, keepdim=True)
            if mask.any():
                break
        # Unchanged pixels keep the image's own values bit for bit.
        return torch.where(mask, warped_levels / 255, image), mask.to(image.dtype)


def check_val_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """Validation's defect kinds as a tuple; a one-line error for an empty list or an unknown kind."""
    return checked_choices("validation.kinds", kinds, VAL_KINDS)


def check_val_placement(placement: str) -> None:
    """Validation's placements are the corruption's: the same foreground test decides both."""
    if placement not in PLACEMENTS:
        raise PatchAEError(
            f"validation.placement={placement!r} is unknown; use uniform (anywhere in the image) or foreground "
            "(on the object)"
        )


class EpochShuffleSampler(Sampler[int]):
    """Random order that depends only on ``(seed, epoch)``; ``set_epoch`` also reaches the dataset.

    Lightning calls ``set_epoch`` on the train sampler before every epoch (also through its distributed
    wrapper), which is how the dataset learns the epoch for its CutPaste seeds.
    """

    def __init__(self, dataset: AnomalyImageDataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(len(self.dataset), generator=generator).tolist())


HOLDOUT = "holdout"


def hold_out(samples: Sequence[Sample], ratio: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split ``ratio`` of the samples off (at least one, never all), chosen by ``seed``; order is kept."""
    samples = list(samples)
    if ratio <= 0:
        return samples, []
    if len(samples) < 2:
        logger.warning(
            "only %d training image(s): nothing can be held out for the label-free threshold", len(samples)
        )
        return samples, []
    count = min(max(1, round(len(samples) * ratio)), len(samples) - 1)
    chosen = set(random.Random(seed).sample(range(len(samples)), count))
    kept = [s for i, s in enumerate(samples) if i not in chosen]
    return kept, [s for i, s in enumerate(samples) if i in chosen]


class AnomalyDataModule(L.LightningDataModule, ABC):
    """Base data module: train (normal, augmented), bank (normal, plain), validation (held-out normals with
    synthetic defects) and test loaders over samples.

    Subclasses implement :meth:`samples`. Paths are checked in :meth:`setup` (or lazily when a loader is
    first requested), raising :class:`~patchae.errors.PatchAEError` with a one-line explanation.

    ``holdout_ratio`` of the normal training images (chosen by ``seed``) are kept out of training and of
    the memory bank; :meth:`holdout_dataloader` serves them so a model can calibrate a label-free threshold
    on scores of normal images it has never seen.
    """

    def __init__(
        self,
        root: str | Path,
        category: str,
        image_size: int | Sequence[int] = 256,
        crop_size: int | Sequence[int] | None = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        augment: CutPaste | None = None,
        seed: int = 0,
        holdout_ratio: float = 0.0,
        val_defects_per_image: int = 2,
        val_bank_images: int = 40,
        val_placement: str = "uniform",
        val_kinds: Sequence[str] = ("cutpaste", "perlin"),
        resize_mode: str = "squash",
        tiling: dict | None = None,
        size_multiple: int = 16,
        cache_mb: float = 1024,
    ) -> None:
        super().__init__()
        if isinstance(holdout_ratio, bool) or not 0.0 <= float(holdout_ratio) < 1.0:
            raise PatchAEError(f"data.holdout_ratio must be in [0, 1), got {holdout_ratio!r}")
        counts = (
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("val_defects_per_image", val_defects_per_image, 1),
            ("val_bank_images", val_bank_images, 1),
        )
        for name, value, minimum in counts:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise PatchAEError(f"data.{name} must be an integer >= {minimum}, got {value!r}")
        if isinstance(cache_mb, bool) or not isinstance(cache_mb, int | float) or cache_mb < 0:
            raise PatchAEError(
                f"data.cache_mb must be a number of megabytes >= 0 (0: no cache), got {cache_mb!r}"
            )
        self.cache_mb = float(cache_mb)
        self._decoded: DecodedImages | None = None
        self._cache_decided = False
        self.root = Path(root).expanduser()
        self.category = str(category)
        self.tiling = Tiling.from_config(tiling)
        self._geometry = {"image_size": image_size, "crop_size": crop_size, "mean": mean, "std": std}
        self.size_multiple = size_multiple
        self._transform: ImageTransform | None = None
        if resize_mode not in ("auto", *RESIZE_MODES):
            raise PatchAEError(
                f"data.resize_mode={resize_mode!r} is unknown; use auto (the default), squash or keep_aspect"
            )
        if resize_mode == "auto":  # chosen from the training images when first needed (see :attr:`transform`)
            # Bad sizes or statistics fail now, before any image is read.
            ImageTransform(image_size, crop_size, mean, std)
            choose_geometry([(1, 1)], image_size, crop_size, size_multiple)
        else:
            self._set_transform(ImageTransform(image_size, crop_size, mean, std, resize_mode))
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.seed = int(seed)
        self.holdout_ratio = float(holdout_ratio)
        self.val_defects_per_image = val_defects_per_image
        self.val_bank_images = val_bank_images
        check_val_placement(val_placement)
        self.val_placement = val_placement
        self.val_kinds = check_val_kinds(val_kinds)
        self._samples: dict[str, list[Sample]] = {}

    @abstractmethod
    def samples(self, split: str) -> list[Sample]:
        """All samples of ``split`` (``"train"`` or ``"test"``), in a deterministic order."""

    # ---- Lightning hooks -------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """List and check the samples the stage needs (``fit``: train; ``test``/``predict``/``validate``: test)."""
        needed = {"fit": ("train",), "test": ("test",), "predict": ("test",), "validate": ("train",)}
        for split in needed.get(stage or "", ("train", "test")):
            self._split_samples(split)

    def train_dataloader(self) -> DataLoader:
        """Normal training images with CutPaste (if configured), reshuffled each epoch."""
        dataset = self._dataset("train", self.augment)
        dataset.tile = self.tiling.tile if self.tiling is not None else None
        return self._loader(
            dataset,
            self.batch_size,
            sampler=EpochShuffleSampler(dataset, self.seed),
            drop_last=len(dataset) > self.batch_size,
            persistent_workers=self.num_workers > 0,  # read every epoch; the other loaders are read once
        )

    def bank_dataloader(self) -> DataLoader:
        """Normal training images without augmentation, in order: the memory-bank source."""
        return self._loader(self._dataset("train", None), self.eval_batch_size)

    def holdout_dataloader(self) -> DataLoader | None:
        """Held-out normal training images (never trained on, not in the bank), or None without any."""
        if not self.holdout_samples:
            return None
        return self._loader(self._dataset(HOLDOUT, None), self.eval_batch_size)

    def val_dataloader(self) -> DataLoader | list:
        """Label-free validation: the held-out normal images, clean and with synthetic defects (exact masks).
        Empty without held-out images (``holdout_ratio=0``)."""
        if not self.holdout_samples:
            return []
        dataset = SyntheticDefectDataset(
            self.holdout_samples,
            self.transform,
            self.augment if self.augment is not None else CutPaste(),
            PerlinBlend(),
            self.val_defects_per_image,
            self.seed,
            self.val_placement,
            self.val_kinds,
        )
        return self._loader(dataset, self.eval_batch_size, persistent_workers=self.num_workers > 0)

    def val_bank_dataloader(self) -> DataLoader:
        """Up to ``val_bank_images`` training images, evenly spread, without augmentation: validation's bank."""
        train = self.train_samples
        step = max(1, len(train) // self.val_bank_images)
        dataset = AnomalyImageDataset(train[::step][: self.val_bank_images], self.transform, None, self.seed)
        return self._loader(dataset, self.eval_batch_size)

    @property
    def has_validation(self) -> bool:
        return bool(self.holdout_samples)

    def test_dataloader(self) -> DataLoader:
        dataset = self._dataset("test", None)
        if len(dataset) == 0:
            raise PatchAEError(f"no test images for {self.name}; {self._no_test_hint()}")
        return self._loader(dataset, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # ---- properties ----------------------------------------------------------------------------------

    @property
    def transform(self) -> ImageTransform:
        """The geometry and normalisation of every item. With ``resize_mode=auto`` it is chosen from the
        training images' sizes on first use (:func:`~patchae.data.geometry.choose_geometry`) and logged."""
        if self._transform is None:
            sizes = image_sizes([sample.path for sample in self.train_samples + self.holdout_samples])
            geometry = choose_geometry(
                sizes, self._geometry["image_size"], self._geometry["crop_size"], self.size_multiple
            )
            logger.info("data.resize_mode=auto chose %s: %s", geometry.resize_mode, geometry.reason)
            self._set_transform(
                ImageTransform(
                    geometry.image_size,
                    geometry.crop_size,
                    self._geometry["mean"],
                    self._geometry["std"],
                    geometry.resize_mode,
                )
            )
        return self._transform

    @property
    def name(self) -> str:
        return self.category

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(height, width)`` of the tensors in every batch."""
        return self.transform.output_shape

    @property
    def train_samples(self) -> list[Sample]:
        return self._split_samples("train")

    @property
    def holdout_samples(self) -> list[Sample]:
        return self._split_samples(HOLDOUT)

    @property
    def test_samples(self) -> list[Sample]:
        return self._split_samples("test")

    @property
    def num_train(self) -> int:
        return len(self.train_samples)

    @property
    def num_test(self) -> int:
        return len(self.test_samples)

    # ---- helpers -------------------------------------------------------------------------------------

    def _split_samples(self, split: str) -> list[Sample]:
        if split == HOLDOUT:
            self._split_samples("train")
            return self._samples[HOLDOUT]
        check_split(split)
        if split not in self._samples:
            samples = self.samples(split)
            if split == "train":
                if not samples:
                    raise PatchAEError(f"no training images for {self.name}")
                samples, self._samples[HOLDOUT] = hold_out(samples, self.holdout_ratio, self.seed)
            self._samples[split] = samples
        return self._samples[split]

    def _set_transform(self, transform: ImageTransform) -> None:
        if self.tiling is not None:
            self.tiling.check_fits(*transform.output_shape)
        self._transform = transform

    def _dataset(self, split: str, augment: CutPaste | None) -> AnomalyImageDataset:
        decoded = self._decoded_train_images() if split == "train" else None
        return AnomalyImageDataset(
            self._split_samples(split), self.transform, augment, self.seed, decoded=decoded
        )

    def _decoded_train_images(self) -> DecodedImages | None:
        """The training images decoded once, when they fit in ``data.cache_mb`` (read every epoch otherwise)."""
        if not self._cache_decided:
            self._cache_decided = True
            size = cache_bytes(len(self.train_samples), self.transform)
            if size <= self.cache_mb * 2**20:
                self._decoded = DecodedImages(self.train_samples, self.transform)
            elif self.cache_mb > 0:
                logger.info(
                    "the training images take %.0f MB decoded, over data.cache_mb=%g: read every epoch",
                    size / 2**20,
                    self.cache_mb,
                )
        return self._decoded

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def _no_test_hint(self) -> str:
        return "add test images"

    def __repr__(self) -> str:
        geometry = self._transform or "resize_mode=auto"  # not chosen yet: reading images here would surprise
        return f"{type(self).__name__}(root={str(self.root)!r}, category={self.category!r}, {geometry})"

    __str__ = __repr__  # Lightning's __str__ builds every dataloader just to print their sizes


class MVTecDataModule(AnomalyDataModule):
    """One MVTec AD category (or any data in its layout) under ``root``; ``download`` fetches it if absent."""

    def __init__(
        self, root: str | Path, category: str = "bottle", download: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(root, category, **kwargs)
        self.download = bool(download)

    def prepare_data(self) -> None:
        if self.download and not (self.root / self.category).is_dir():
            if self.category not in MVTEC_CATEGORIES:  # before a 5 GB download, not after it
                raise PatchAEError(
                    f"category={self.category} is not an MVTec AD category, so data.download cannot fetch it; "
                    f"use one of {', '.join(MVTEC_CATEGORIES)}"
                )
            download_mvtec(self.root, self.category)

    def samples(self, split: str) -> list[Sample]:
        return mvtec_samples(self.root, self.category, split)


class SyntheticDataModule(AnomalyDataModule):
    """The generated synthetic category (see :mod:`patchae.data.synthetic`), created on first use."""

    def __init__(
        self,
        root: str | Path = "data/synthetic",
        category: str = "synthetic",
        n_train: int = 60,
        n_test_good: int = 12,
        n_test_defect: int = 24,
        synthetic_size: int | Sequence[int] = 256,
        synthetic_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, category, **kwargs)
        self.generator_args = {
            "n_train": n_train,
            "n_test_good": n_test_good,
            "n_test_defect": n_test_defect,
            "image_size": synthetic_size,
            "seed": synthetic_seed,
        }

    def prepare_data(self) -> None:
        from patchae.data.synthetic import generate_synthetic_category  # lazy: see patchae.data.__getattr__

        generate_synthetic_category(self.root, self.category, **self.generator_args)

    def samples(self, split: str) -> list[Sample]:
        check_split(split)
        self.prepare_data()  # a no-op when already generated; covers use without a Trainer
        return mvtec_samples(self.root, self.category, split)


class FolderDataModule(AnomalyDataModule):
    """The user's own folders: normal images to train on, optional abnormal images (+ masks) to test on."""

    def __init__(
        self,
        normal_dir: str | Path,
        abnormal_dir: str | Path | None = None,
        mask_dir: str | Path | None = None,
        normal_test_dir: str | Path | None = None,
        test_split_ratio: float = 0.2,
        root: str | Path | None = None,
        category: str = "custom",
        **kwargs: Any,
    ) -> None:
        if normal_dir is None:
            raise PatchAEError(
                "data.normal_dir is required for folder data: set it to a folder of normal images"
            )
        normal_dir = Path(normal_dir).expanduser()
        super().__init__(root if root is not None else normal_dir.parent, category, **kwargs)
        self.normal_dir = normal_dir
        self.abnormal_dir = abnormal_dir
        self.mask_dir = mask_dir
        self.normal_test_dir = normal_test_dir
        self.test_split_ratio = test_split_ratio

    def samples(self, split: str) -> list[Sample]:
        return folder_samples(
            self.normal_dir,
            self.abnormal_dir,
            self.mask_dir,
            self.normal_test_dir,
            split=split,
            test_split_ratio=self.test_split_ratio,
            seed=self.seed,
        )

    def _no_test_hint(self) -> str:
        return "set data.abnormal_dir and/or data.normal_test_dir"


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
