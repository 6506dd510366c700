"""The Lightning wrappers every model shares. A model's scoring is its torch module's (``self.model``: network +
scorer, :mod:`patchae.models.torch_model`); the wrappers add what Lightning does around it: training hooks,
label-free validation, test metrics, threshold calibration and the checkpoint's contents.

- :class:`AnomalyModule`: the base. Settings come as the config groups they are (``scoring``, ``bank``,
  ``threshold``, ``preprocessing``; :mod:`patchae.settings`), saved in model.ckpt, so that a loaded model
  preprocesses and scores as it was tested.
- :class:`ReconstructionModule`: adds what SSL-AE and DAAD share (a from-scratch or pretrained encoder,
  parameter groups, clean training images).
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from patchae.checkpoints import to_plain
from patchae.data.datamodule import seeded_generator
from patchae.data.lighting import LightingJitter
from patchae.errors import PatchAEError
from patchae.metrics import AnomalyMetrics
from patchae.models.reconstruction import pretrained_encoder
from patchae.models.torch_model import BankModel, ReconstructionModel, Subsample
from patchae.scoring import BankScorer
from patchae.settings import BankSettings, Preprocessing, ScoringSettings, ThresholdSettings, read_group
from patchae.thresholds import Thresholds, calibrate, decision_accuracy
from patchae.tiling import Tiling

CHECKPOINT_KEY = "patchae"
LR_SCHEDULES = ("constant", "cosine")
SETTING_GROUPS = ("scoring", "bank", "threshold", "preprocessing")

# Checkpoints written before the settings were passed as groups hold them as flat hyper-parameters:
# old name -> (group, name in the group). load_model's flat overrides (search=..., faiss_index=...) use it too.
FLAT_SETTINGS: dict[str, tuple[str, str]] = {
    **{name: ("scoring", name) for name in ("blur_sigma", "image_score", "top_k", "reweight_neighbors")},
    **{name: ("bank", name) for name in ("num_neighbors", "search", "faiss_device", "faiss_index")},
    **{f"threshold_{name}": ("threshold", name) for name in ("method", "quantile", "value")},
    **{
        name: ("preprocessing", name)
        for name in ("image_size", "crop_size", "resize_mode", "mean", "std", "tiling")
    },
}


def set_setting(hparams: dict[str, Any], key: str, value: Any, arguments: Container[str] = ()) -> None:
    """Set ``key`` in ``hparams``: a model argument, or a flat setting name (``search``) inside its group;
    nothing for a setting the model does not take (SSL-AE has no ``bank``). ``arguments`` are the model's
    argument names: one of them that ``hparams`` lacks (an option newer than the checkpoint) is set too."""
    if key in FLAT_SETTINGS and key not in hparams:
        group, name = FLAT_SETTINGS[key]
        if group in hparams:
            hparams[group] = {**(hparams[group] or {}), name: value}
    elif key in hparams or key in arguments:
        hparams[key] = value


def upgrade_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyper-parameters in today's form: an older file's flat settings moved into their groups.
    A group the model does not take (the old files of SSL-AE and DAAD had no search settings) is not made."""
    upgraded = dict(hparams)
    if any(group in upgraded for group in SETTING_GROUPS):
        return upgraded
    for old, (group, name) in FLAT_SETTINGS.items():
        if old in upgraded:
            upgraded.setdefault(group, {})[name] = upgraded.pop(old)
    return upgraded


def upgrade_state_dict(state_dict: dict[str, Any], renames: tuple[tuple[str, str | None], ...]) -> None:
    """Rename, in place, the keys of an older checkpoint's weights: each (old prefix, new prefix) of ``renames``,
    the first that matches; a key renamed to ``None`` is dropped."""
    for key in list(state_dict):
        for old, new in renames:
            if key == old or (old.endswith(".") and key.startswith(old)):
                value = state_dict.pop(key)
                if new is not None:
                    state_dict[new + key[len(old) :]] = value
                break


def update_metrics(
    metrics: AnomalyMetrics, scores: torch.Tensor, maps: torch.Tensor, batch: dict[str, Any]
) -> None:
    """Adds a batch to ``metrics``. Where inputs are padded (``data.resize_mode=keep_aspect``), the pixel
    metrics count only each image's ``content_box`` (top, left, bottom, right): padding is not a normal part."""
    scores, labels, maps = scores.cpu(), batch["label"].cpu(), maps.cpu()
    masks, has_mask = batch["mask"][:, 0].cpu(), batch["has_mask"].cpu()
    indices = batch.get("index")  # the dataset's, to gather the processes' shares under DDP
    boxes = batch.get("content_box")
    full = torch.tensor([0, 0, *maps.shape[-2:]])
    if boxes is None or bool((boxes.cpu() == full).all()):
        metrics.update(scores, labels, maps, masks, has_mask, indices)
        return
    for i, (top, left, bottom, right) in enumerate(boxes.tolist()):
        window = (slice(i, i + 1), slice(top, bottom), slice(left, right))
        one = slice(i, i + 1)
        index = None if indices is None else indices[one]
        metrics.update(scores[one], labels[one], maps[window], masks[window], has_mask[one], index)


class AnomalyModule(L.LightningModule):
    """What every model's Lightning wrapper shares: scoring is ``self.model``'s (set by the subclass), fitted
    at the end of fit by :class:`patchae.callbacks.MemoryBankCallback` and saved in the checkpoint, so a loaded
    model scores without its training data.

    Testing also calibrates the decision threshold (:mod:`patchae.thresholds`): the F1-optimal one on the
    test split and a label-free quantile of ``normal_scores``, the scores of held-out normal images
    (:class:`patchae.callbacks.HoldoutScoresCallback`). ``self.thresholds`` is saved in the checkpoint together with
    the model's class, so :func:`patchae.deploy.loading.load_model` restores the right model.
    """

    model: BankModel | ReconstructionModel
    # Weights of checkpoints written before ``self.model`` held network and scorer: (old key or prefix, new).
    legacy_state_keys: tuple[tuple[str, str | None], ...] = ()
    CHECKPOINT_FORMAT = 2  # 2: settings as groups, weights under model.network / model.scorer

    def __init__(
        self,
        scoring: Mapping[str, Any] | None = None,
        bank: Mapping[str, Any] | None = None,
        threshold: Mapping[str, Any] | None = None,
        preprocessing: Mapping[str, Any] | None = None,
        val_bank_size: int = 20000,
    ) -> None:
        super().__init__()
        self.scoring = read_group(ScoringSettings, scoring, "scoring")
        self.bank_settings = read_group(BankSettings, bank, "bank")
        self.threshold_settings = read_group(ThresholdSettings, threshold, "threshold")
        self.preprocessing = read_group(Preprocessing, preprocessing, "preprocessing")
        self.tiling = Tiling.from_config(self.preprocessing.tiling)  # data.tiling: score tiles, stitch maps
        self.val_bank_size = int(val_bank_size)
        self.test_metrics = AnomalyMetrics()
        self.test_results: dict[str, float] = {}
        self.thresholds = Thresholds()
        self.normal_scores = torch.empty(0)
        self.val_metrics = AnomalyMetrics()
        self.val_results: dict[str, float] = {}  # of the weights the fit kept (see BestEpochCallback)
        self.selected_epoch: int | None = None
        self.latest_val_results: dict[str, float] = {}
        self._val_scorer: nn.Module | None = None

    def bank_scorer(self) -> BankScorer:
        """A :class:`BankScorer` with this model's settings (for the bank models' ``self.model``)."""
        return BankScorer(self.bank_settings, self.scoring, self.tiling)

    # -- scoring: the torch model's ------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        """Whether the model can score: its bank (or, without one, its normal statistics) exists."""
        return self.model.scorer.is_fitted

    @property
    def bank_size(self) -> int:
        return self.model.scorer.bank_size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps (B, H, W) at input resolution and image scores (B,)."""
        return self.model(images)

    def fit_scorer(self, batches: Iterable[torch.Tensor], subsample: Subsample | None = None) -> None:
        """Fit the scorer on batches of normal images (the memory-bank callback's, at the end of fit)."""
        self.model.fit(batches, subsample)
        self.normal_scores = torch.empty(0)  # scores against the old bank (or statistics) are stale

    def image_batches(self, loader: Iterable[dict[str, Any]]) -> Iterator[torch.Tensor]:
        """The images of a data loader's batches, on the model's device."""
        for batch in loader:
            yield batch["image"].to(self.device)

    @torch.no_grad()
    def score_images(self, loader: Iterable[dict[str, Any]]) -> torch.Tensor:
        """(N,) image scores of a loader's images, in eval mode (the held-out normals' for the threshold)."""
        was_training = self.training
        self.eval()
        scores = [self(images)[1].float().cpu() for images in self.image_batches(loader)]
        self.train(was_training)
        return torch.cat(scores) if scores else torch.empty(0)

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """Raw scores or maps -> [0, 1] with the decision threshold at 0.5 (nan before calibration)."""
        return self.thresholds.normalize(scores)

    def predict_step(
        self, batch: dict[str, Any] | torch.Tensor, batch_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """Raw and normalised maps and scores, and the decision (score >= threshold) of a batch."""
        images = batch["image"] if isinstance(batch, dict) else batch
        maps, scores = self(images)
        return {
            "anomaly_maps": maps,
            "image_scores": scores,
            "normalized_maps": self.normalize(maps),
            "normalized_scores": self.normalize(scores),
            "is_anomalous": self.thresholds.is_anomalous(scores),
        }

    # -- label-free validation --------------------------------------------------------------------
    # The data module's validation set: held-out normal images, clean and with synthetic defects (exact masks).
    # They are scored by a scorer of the model's kind fitted with the current weights on validation's training
    # images (for a bank: up to ``val_bank_size`` random patch vectors of them, a cheap stand-in for the coreset),
    # which :class:`patchae.callbacks.MemoryBankCallback` hands to :meth:`fit_validation_scorer` first.
    def fit_validation_scorer(self, batches: Iterable[torch.Tensor]) -> None:
        self._val_scorer = self.model.scorer.twin()
        self.model.fit(batches, self.random_subset, scorer=self._val_scorer)

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()
        if self._val_scorer is None:
            raise PatchAEError(
                "validation needs its scorer fitted first: add patchae.callbacks.MemoryBankCallback to the callbacks"
            )

    def random_subset(self, vectors: torch.Tensor) -> torch.Tensor:
        """Indices of at most ``val_bank_size`` of ``vectors``, the same ones every validation."""
        if len(vectors) <= self.val_bank_size:
            return torch.arange(len(vectors))
        return torch.randperm(len(vectors), generator=torch.Generator().manual_seed(0))[: self.val_bank_size]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        maps, scores = self.model(batch["image"], scorer=self._val_scorer)
        update_metrics(self.val_metrics, scores, maps, batch)

    def on_validation_epoch_end(self) -> None:
        self.val_metrics.gather()  # under DDP: every process's share, so all processes keep the same epoch
        results = self.val_metrics.compute()
        self._val_scorer = None
        self.latest_val_results = results
        # Equal on every process; sync_dist (a mean of equal values) keeps Lightning from warning under DDP.
        val = {f"val/{name}": results[name] for name in ("image_auroc", "pixel_auroc", "aupro")}
        self.log_dict(val, sync_dist=True)

    def validation_summary(self) -> dict[str, Any]:
        """``val_*`` metrics of the kept weights and the epoch they are from, for results files."""
        if self.selected_epoch is None:
            return {}
        return {
            "selected_epoch": self.selected_epoch,
            **{f"val_{name}": value for name, value in self.val_results.items()},
        }

    # -- testing ----------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        maps, scores = self(batch["image"])
        update_metrics(self.test_metrics, scores, maps, batch)
        return {"anomaly_maps": maps.cpu(), "image_scores": scores.cpu()}

    def on_test_epoch_end(self) -> None:
        self.test_metrics.gather()  # under DDP: the whole split on every process, each image once
        self.test_results = self.test_metrics.compute()
        scores, labels = self.test_metrics.scores_and_labels()
        self.thresholds = calibrate(
            scores,
            labels,
            self.normal_scores,
            self.threshold_settings.method,
            self.threshold_settings.quantile,
            self.threshold_settings.value,
        )
        self.test_results["image_threshold"] = self.thresholds.value
        self.test_results["image_accuracy"] = decision_accuracy(scores, labels, self.thresholds.value)
        self.log_dict({f"test/{name}": value for name, value in self.test_results.items()}, sync_dist=True)

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain values only, so that the file loads weights-only (patchae.checkpoints).
        checkpoint[CHECKPOINT_KEY] = to_plain(
            {
                "model_class": f"{type(self).__module__}.{type(self).__qualname__}",
                "thresholds": self.thresholds.as_dict(),
                "format": self.CHECKPOINT_FORMAT,
            }
        )
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = to_plain(dict(checkpoint["hyper_parameters"]))
            checkpoint.pop("hparams_type", None)  # a class, saved when hparams are an OmegaConf container

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY, {})
        if (
            saved.get("format", 1) < self.CHECKPOINT_FORMAT
        ):  # an older file: its weights under their old names
            upgrade_state_dict(checkpoint["state_dict"], self.legacy_state_keys)
        self.thresholds = Thresholds.from_dict(saved.get("thresholds"))
        self.normal_scores = torch.tensor(self.thresholds.normal_scores, dtype=torch.float32)


class ReconstructionModule(AnomalyModule):
    """What SSL-AE's and DAAD's wrappers share: ``self.model`` is a :class:`ReconstructionModel` whose network
    (``self.model.network``) may start from a pretrained timm encoder (``backbone``), trained on clean images."""

    model: ReconstructionModel

    def vary_lighting(
        self, images: torch.Tensor, lighting: LightingJitter, seed: int, step: int
    ) -> torch.Tensor:
        """The (normalised) batch with each image lit differently (:mod:`patchae.data.lighting`), drawn from
        ``(seed, step, index)``: the same every run. Unchanged when ``lighting`` is not active."""
        if not lighting.active:
            return images
        mean = torch.tensor(self.preprocessing.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocessing.std, device=images.device).view(1, 3, 1, 1)
        unit = images * std + mean
        lit = [lighting(unit[i], seeded_generator(seed, step, i, 1)) for i in range(len(unit))]
        return (torch.stack(lit) - mean) / std

    def build_encoder(self) -> nn.Module | None:
        """The pretrained encoder the hyperparameters name (``backbone`` a timm model), or None (scratch)."""
        hparams = self.hparams
        if hparams.backbone == "scratch":
            return None
        return pretrained_encoder(
            hparams.backbone, hparams.encoder_layers, hparams.pretrained, hparams.weights
        )

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The network's parameters at ``lr``, a pretrained encoder's at ``encoder_lr``."""
        network = self.model.network
        encoder = getattr(network, "pretrained", None)
        if encoder is None:
            return [{"params": list(network.parameters()), "lr": self.hparams.lr}]
        own = {id(p) for p in encoder.parameters()}
        rest = [p for p in network.parameters() if id(p) not in own]
        return [
            {"params": rest, "lr": self.hparams.lr},
            {"params": list(encoder.parameters()), "lr": self.hparams.encoder_lr},
        ]

    def learning_rate_schedule(
        self, optimizer: torch.optim.Optimizer
    ) -> torch.optim.lr_scheduler.LambdaLR | None:
        """The scheduler of ``lr_schedule`` for ``optimizer``, stepped once per training step: ``constant`` (None)
        or ``cosine`` (every group's rate falls from its own value to 0 along half a cosine over the whole fit:
        the last epochs refine instead of hopping between nearby solutions)."""
        schedule = self.hparams.get("lr_schedule", "constant")
        if schedule not in LR_SCHEDULES:
            raise PatchAEError(f"model.lr_schedule={schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if schedule == "constant":
            return None
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_factor(step, total))

    def train(self, mode: bool = True) -> ReconstructionModule:
        super().train(mode)
        self.keep_encoder_batchnorm()
        return self

    def on_train_epoch_start(self) -> None:
        self.keep_encoder_batchnorm()  # Lightning does not call train() when fitting starts

    def keep_encoder_batchnorm(self) -> None:
        """A pretrained encoder keeps its BatchNorm statistics: small batches would make poor ones."""
        model = getattr(self, "model", None)
        encoder = getattr(getattr(model, "network", None), "pretrained", None)
        if encoder is not None:
            for module in encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def on_fit_start(self) -> None:
        if getattr(self.trainer.datamodule, "augment", None) is not None:
            raise PatchAEError(
                f"{type(self).__name__} trains on clean normal images, but the data adds CutPaste defects; "
                "add augment=none"
            )


def cosine_factor(step: int, total: int) -> float:
    """Half a cosine from 1 at step 0 to 0 at step ``total`` (and after)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
