"""Label-free validation: synthetic defects with exact masks, and keeping the weights of the best validation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image
from torch import nn

from patchae.callbacks import BestEpochCallback
from patchae.data import SyntheticDataModule
from patchae.data.cutpaste import CutPaste
from patchae.data.datamodule import SyntheticDefectDataset
from patchae.data.perlin import PerlinBlend, perlin_noise
from patchae.data.samples import Sample
from patchae.data.transforms import ImageTransform
from patchae.errors import PatchAEError


def _image(seed: int, size: tuple[int, int] = (64, 80)) -> torch.Tensor:
    return torch.rand((3, *size), generator=torch.Generator().manual_seed(seed))


def test_perlin_noise_is_seeded_and_bounded() -> None:
    a = perlin_noise(48, 64, (4, 2), torch.Generator().manual_seed(1))
    b = perlin_noise(48, 64, (4, 2), torch.Generator().manual_seed(1))
    assert a.shape == (48, 64) and torch.equal(a, b)
    assert a.abs().max() <= 1.0 and a.std() > 0.05


def test_perlin_blend_mask_is_exactly_the_changed_pixels() -> None:
    blend = PerlinBlend()
    for seed in range(40):
        image, source = _image(seed), _image(1000 + seed)
        out, mask = blend(image, source, torch.Generator().manual_seed(seed))
        assert mask.shape == (1, 64, 80) and mask.sum() > 0
        changed = (out != image).any(dim=0)
        assert torch.equal(changed, mask[0].bool()), f"seed {seed}: mask differs from the changed pixels"
        assert 0 <= out.min() and out.max() <= 1


def test_perlin_blend_rejects_bad_settings() -> None:
    with pytest.raises(PatchAEError, match="opacity"):
        PerlinBlend(opacity=(0.5, 1.0))
    with pytest.raises(PatchAEError, match="scale_exponents"):
        PerlinBlend(scale_exponents=(3, 1))


@pytest.fixture
def datamodule(tmp_path) -> SyntheticDataModule:
    module = SyntheticDataModule(
        root=tmp_path / "data",
        n_train=20,
        n_test_good=2,
        n_test_defect=2,
        synthetic_size=64,
        image_size=64,
        crop_size=None,
        holdout_ratio=0.2,
        val_defects_per_image=2,
        augment=CutPaste(probability=0.5),
        seed=3,
    )
    module.setup("fit")
    return module


def test_validation_set_masks_match_the_pixels_changed(datamodule: SyntheticDataModule) -> None:
    dataset = datamodule.val_dataloader().dataset
    assert len(dataset) == 3 * len(datamodule.holdout_samples) == 12
    kinds = {}
    for index in range(len(dataset)):
        item = dataset[index]
        clean = dataset[index - index % 3]["image"]  # version 0 of the same image
        changed = (item["image"] != clean).any(dim=0)
        assert torch.equal(changed, item["mask"][0].bool()), (
            f"item {index}: mask differs from the changed pixels"
        )
        assert item["label"].item() == int(changed.any())
        kinds.setdefault(item["defect_type"], []).append(item["label"].item())
    assert kinds["good"] == [0, 0, 0, 0]
    assert kinds["cutpaste"] == [1, 1, 1, 1] and kinds["perlin"] == [1, 1, 1, 1]
    again = datamodule.val_dataloader().dataset[5]
    assert torch.equal(again["image"], dataset[5]["image"])  # the same items at every validation


def test_validation_never_uses_training_or_bank_images(datamodule: SyntheticDataModule) -> None:
    held_out = {str(s.path) for s in datamodule.holdout_samples}
    validation = {item["path"] for item in datamodule.val_dataloader().dataset}
    bank = {path for batch in datamodule.val_bank_dataloader() for path in batch["path"]}
    assert validation == held_out
    assert not bank & held_out and bank <= {str(s.path) for s in datamodule.train_samples}


def _trainer(score: float, epoch: int, fn: TrainerFn = TrainerFn.FITTING) -> SimpleNamespace:
    return SimpleNamespace(
        callback_metrics={"val/image_auroc": torch.tensor(score)},
        current_epoch=epoch,
        state=SimpleNamespace(fn=fn),
        sanity_checking=False,
        should_stop=False,
    )


@pytest.mark.parametrize("select", [True, False])
def test_best_epoch_callback_keeps_the_best_or_the_last_weights_and_stops_on_patience(select) -> None:
    module = nn.Linear(2, 1)
    callback = BestEpochCallback(monitor="val/image_auroc", patience=2, select=select)
    stops = []
    # epoch 0 (validate before fit), then after epochs 1, 2, 3: the best is after epoch 1
    for score, epoch, fn in (
        (0.6, 0, TrainerFn.VALIDATING),
        (0.9, 0, TrainerFn.FITTING),
        (0.7, 1, TrainerFn.FITTING),
        (0.8, 2, TrainerFn.FITTING),
    ):
        with torch.no_grad():
            module.weight.fill_(score)
        module.latest_val_results = {"image_auroc": score}
        trainer = _trainer(score, epoch, fn)
        callback.on_validation_end(trainer, module)
        stops.append(trainer.should_stop)
    assert stops == [False, False, False, True]  # two validations without improvement, selecting or not
    assert (callback.best_state is not None) == select  # weights are copied only to be restored
    callback.on_fit_end(trainer, module)
    kept, epoch = (0.9, 1) if select else (0.8, 3)
    assert module.weight.flatten().tolist() == pytest.approx([kept, kept])
    assert module.selected_epoch == epoch and module.val_results == {"image_auroc": kept}


def test_best_epoch_callback_names_the_metrics_it_can_monitor() -> None:
    callback = BestEpochCallback(monitor="val/typo")
    with pytest.raises(PatchAEError, match="val/image_auroc"):
        callback.on_validation_end(_trainer(0.5, 0), nn.Linear(1, 1))


def test_a_fit_that_ruins_the_encoder_keeps_the_untrained_weights(tmp_path) -> None:
    """Epoch 0 is validated before training: when training only hurts, its weights are the ones restored."""
    from hydra import compose, initialize_config_dir

    from conftest import REPO, TINY_RUN
    from patchae.train import build

    overrides = [
        *TINY_RUN,
        "trainer.max_epochs=2",
        "data.n_train=20",
        "threshold.holdout_ratio=0.3",
        "validation.monitor=val/pixel_auroc",  # steadier than the image AUROC of 6 held-out images
        "validation.select_best=true",
        f"paths.output_dir={tmp_path / 'run'}",
        f"data.root={tmp_path / 'data'}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    datamodule, model, trainer = build(cfg)

    def wreck_the_backbone(*_) -> None:
        # Training that surely hurts (a high learning rate did not, in every run): after each step every
        # convolution of the backbone is zeroed, so its features carry no image content (the maps keep only
        # border effects and rounding: 0.66-0.72 pixel AUROC measured, against 0.755 untrained).
        with torch.no_grad():
            for layer in model.model.network.backbone.modules():
                if isinstance(layer, nn.Conv2d):
                    layer.weight.zero_()

    model.on_train_batch_end = wreck_the_backbone
    pretrained = {k: v.clone() for k, v in model.model.network.backbone.state_dict().items()}
    trainer.validate(model, datamodule=datamodule, verbose=False)
    trainer.fit(model, datamodule=datamodule)
    callback = next(c for c in trainer.callbacks if isinstance(c, BestEpochCallback))
    assert trainer.current_epoch == 2 and callback.last_epoch == 2  # it did train, and validated each epoch
    assert model.selected_epoch == 0
    assert model.val_results["pixel_auroc"] > max(0.6, callback.last_results["pixel_auroc"])
    assert all(torch.equal(v, model.model.network.backbone.state_dict()[k]) for k, v in pretrained.items())
    assert model.is_fitted  # built from the restored weights
    assert model.validation_summary()["selected_epoch"] == 0


def test_a_later_epoch_must_beat_the_best_by_min_delta() -> None:
    module = nn.Linear(1, 1)
    callback = BestEpochCallback(monitor="val/image_auroc", min_delta=0.01)
    for score, epoch in ((0.800, 0), (0.805, 0), (0.812, 1), (0.790, 2)):
        with torch.no_grad():
            module.weight.fill_(score)
        module.latest_val_results = {"image_auroc": score}
        fn = TrainerFn.VALIDATING if score == 0.800 else TrainerFn.FITTING
        callback.on_validation_end(_trainer(score, epoch, fn), module)
    callback.on_fit_end(_trainer(0.79, 2), module)
    # 0.805 is within 0.01 of 0.800 (noise): kept out; 0.812 beats it by more.
    assert module.selected_epoch == 2 and module.weight.item() == pytest.approx(0.812)


def _object_images(folder, count: int = 8) -> list[Sample]:
    """Plain grey pictures with a textured square covering 9 % of each: an object on a plain background."""
    samples = []
    for index in range(count):
        picture = torch.full((64, 64, 3), 0.5)
        texture = torch.rand((19, 19, 3), generator=torch.Generator().manual_seed(index))
        picture[24:43, 24:43] = 0.7 + 0.3 * texture
        path = folder / f"{index}.png"
        Image.fromarray((picture * 255).round().to(torch.uint8).numpy()).save(path)
        samples.append(Sample(path, 0, None, "good"))
    return samples


def test_foreground_validation_puts_the_defects_on_the_object(tmp_path) -> None:
    samples = _object_images(tmp_path)
    shares = {}
    for placement in ("uniform", "foreground"):
        dataset = SyntheticDefectDataset(
            samples, ImageTransform(64), CutPaste(), PerlinBlend(), defects_per_image=6, placement=placement
        )
        on_object = []  # per defect: whether most of its changed pixels lie on the object
        for index in range(len(dataset)):
            item = dataset[index]
            clean = dataset[index - index % dataset.versions]["image"]
            # The masks stay exactly the changed pixels.
            assert torch.equal((item["image"] != clean).any(dim=0), item["mask"][0].bool())
            if item["label"]:
                on_object.append(bool(item["mask"][0, 24:43, 24:43].sum() >= item["mask"].sum() / 2))
        shares[placement] = sum(on_object) / len(on_object)
    assert shares["uniform"] < 0.5  # the object is 9 % of the image
    assert shares["foreground"] > 0.9


def test_foreground_validation_keeps_uniform_draws_without_an_object(tmp_path) -> None:
    samples = [Sample(tmp_path / "plain.png", 0, None, "good")]
    Image.fromarray(torch.full((64, 64, 3), 128, dtype=torch.uint8).numpy()).save(samples[0].path)
    datasets = [
        SyntheticDefectDataset(samples, ImageTransform(64), CutPaste(), PerlinBlend(), 2, placement=placement)
        for placement in ("uniform", "foreground")
    ]
    for index in range(len(datasets[0])):
        assert torch.equal(datasets[0][index]["image"], datasets[1][index]["image"])


def test_an_unknown_validation_placement_says_what_to_use(tmp_path) -> None:
    with pytest.raises(PatchAEError, match=r"validation.placement='object' is unknown; use uniform"):
        SyntheticDataModule(root=tmp_path, val_placement="object")


def test_warp_defects_move_the_objects_own_material_and_mask_exactly_what_changed(tmp_path) -> None:
    samples = _object_images(tmp_path)
    dataset = SyntheticDefectDataset(
        samples, ImageTransform(64), CutPaste(), PerlinBlend(), 3, placement="foreground", kinds=["warp"]
    )
    for index in range(len(dataset)):
        item = dataset[index]
        if index % dataset.versions == 0:
            assert item["defect_type"] == "good" and item["label"] == 0
            continue
        clean = dataset[index - index % dataset.versions]["image"]
        changed = (item["image"] != clean).any(dim=0)
        assert item["defect_type"] == "warp" and item["label"] == 1
        assert torch.equal(changed, item["mask"][0].bool())
        assert item["mask"][0, 24:43, 24:43].sum() >= item["mask"].sum() / 2  # on the object
        # Displaced by at most 4 % of the side (2.6 px): every pixel holds values found within 3 px of it in
        # the clean image, no foreign colour (normalisation is increasing per channel, so ranges carry over).
        pool = torch.nn.functional.max_pool2d
        high, low = pool(clean[None], 7, 1, 3)[0], -pool(-clean[None], 7, 1, 3)[0]
        assert bool(((item["image"] >= low - 1e-5) & (item["image"] <= high + 1e-5)).all())


def test_an_unknown_validation_kind_says_what_to_use(tmp_path) -> None:
    with pytest.raises(
        PatchAEError,
        match=r"validation.kinds=\['scratch'\] must be a non-empty list of cutpaste, perlin, warp",
    ):
        SyntheticDataModule(root=tmp_path, val_kinds=["scratch"])
    with pytest.raises(PatchAEError, match="non-empty"):
        SyntheticDataModule(root=tmp_path, val_kinds=[])
