"""The config tree: every experiment and every group option composes, and what it describes instantiates."""

import json
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from conftest import run_tiny_sweep
from dataset_fakes import FAKE_COPIES
from patchae.callbacks import MemoryBankCallback, ResultsWriter
from patchae.data import MVTEC_CATEGORIES
from patchae.models import DAADModule, PatchAEModule, PatchCoreModule, SSLAEModule
from patchae.train import build
from patchae.wandb_media import WandbMediaCallback

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(path.stem for path in (ROOT / "experiments").glob("*.yaml"))
HUB_BACKBONES = ("wide_resnet101_2", "wide_resnet50_2", "resnet18")  # weights need the internet


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def write_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(folder / f"{i:03d}.png")


def small_data(target: str, category: str, tmp_path: Path, dataset: str | None = None) -> list[str]:
    """Overrides pointing the data module at a few images in tmp_path (build() checks the data exists)."""
    if target.endswith("MVTecDataModule"):
        write_images(tmp_path / "mvtec" / category / "train" / "good", 2)
        return [f"data.root={tmp_path / 'mvtec'}"]
    if target.endswith("SyntheticDataModule"):
        return [
            f"data.root={tmp_path / 'synthetic'}",
            "data.n_train=2",
            "data.n_test_good=1",
            "data.n_test_defect=1",
            "data.synthetic_size=32",
        ]
    if target.endswith("FolderDataModule"):
        write_images(tmp_path / "normal", 4)
        return [f"data.normal_dir={tmp_path / 'normal'}"]
    if target.endswith("PublicDataModule"):
        fake_category, write = FAKE_COPIES[str(dataset)]
        return [f"data.root={write(tmp_path / str(dataset))}", f"category={fake_category}"]
    raise AssertionError(f"no small data for {target}")


def compose_config(overrides: list[str], tmp_path: Path, hydra: bool = False):
    overrides = [*overrides, f"paths.output_dir={tmp_path / 'out'}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        if hydra:
            return compose("train", overrides=overrides, return_hydra_config=True)
        first = compose("train", overrides=overrides)
        cfg = compose(
            "train",
            overrides=[
                *overrides,
                *small_data(first.data._target_, first.category, tmp_path, first.data.get("dataset")),
            ],
        )
    if cfg.backbone.name in HUB_BACKBONES:
        cfg.backbone.pretrained = False
    return cfg


def job_count(params: dict[str, str]) -> int:
    """How many jobs Hydra's basic sweeper makes of ``hydra.sweeper.params``."""
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    return len(BasicSweeper.split_arguments(parsed, max_batch_size=None)[0])


def test_the_expected_experiments_and_options_exist():
    assert {
        "demo",
        "paper",
        "sweep_alpha",
        "sweep_cutpaste",
        "sweep_layers",
        "all_categories",
        "optuna",
    } <= set(EXPERIMENTS)
    assert {"patch_ae", "patchcore"} <= set(options("model"))
    assert {"default", "cpu", "gpu", "ddp"} <= set(options("trainer"))
    assert {"csv", "tensorboard", "wandb", "none"} <= set(options("logger"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert cfg.experiment_name == experiment
    datamodule, model, trainer = build(cfg)
    assert isinstance(datamodule, L.LightningDataModule)
    assert isinstance(model, PatchAEModule | PatchCoreModule | SSLAEModule | DAADModule)
    assert isinstance(trainer, L.Trainer)
    kinds = [type(callback) for callback in trainer.callbacks]
    # The bank is built before the results writer stops the clock, and W&B media read the results writer.
    assert kinds.index(MemoryBankCallback) < kinds.index(ResultsWriter) < kinds.index(WandbMediaCallback)


GROUP_OPTIONS = [
    (group, option)
    for group in ("data", "backbone", "model", "augment", "callbacks", "logger", "trainer")
    for option in options(group)
]


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group != "backbone":
        overrides.append("backbone=efficientnet_lite0")  # one small backbone for all other groups
    if group == "trainer" and option in ("gpu", "ddp"):
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true"]  # this machine has no GPU
        if option == "ddp":
            overrides.append("trainer.devices=2")
    cfg = compose_config(overrides, tmp_path)
    datamodule, model, trainer = build(cfg)
    if group == "model":
        names = {
            "patch_ae": "PatchAEModule",
            "patchcore": "PatchCoreModule",
            "ssl_ae": "SSLAEModule",
            "daad": "DAADModule",
        }
        assert type(model).__name__ == names[option]
    if group == "logger":
        assert len(trainer.loggers) == (0 if option == "none" else 1)
    if group == "trainer" and option == "ddp":
        assert type(trainer.strategy).__name__ == "DDPStrategy"
        assert trainer.num_devices == 2


def test_patchcore_shares_the_backbone_and_bank_settings_of_patch_ae(tmp_path):
    overrides = [
        "backbone=efficientnet_lite0",
        "bank.num_neighbors=3",
        "bank.search=torch",
        "scoring.blur_sigma=2",
        "threshold.method=quantile",
        "threshold.quantile=0.95",
    ]
    patch_ae = compose_config([*overrides, "model=patch_ae"], tmp_path).model
    patchcore = compose_config([*overrides, "model=patchcore"], tmp_path).model
    for key in ("backbone", "layers", "scoring", "bank", "threshold", "preprocessing"):
        assert (
            OmegaConf.to_container(patchcore, resolve=True)[key]
            == OmegaConf.to_container(patch_ae, resolve=True)[key]
        )
    resolved = OmegaConf.to_container(patchcore, resolve=True)
    assert resolved["bank"]["num_neighbors"] == 3 and resolved["bank"]["search"] == "torch"
    assert resolved["scoring"]["blur_sigma"] == 2 and resolved["threshold"]["quantile"] == 0.95


def test_patchcore_run_skips_training(tmp_path):
    cfg = compose_config(["model=patchcore", "backbone=efficientnet_lite0", "trainer.max_epochs=5"], tmp_path)
    _, model, trainer = build(cfg)
    assert trainer.limit_train_batches == 0  # on_fit_end (the memory bank) still runs
    _, _, patch_ae_trainer = build(compose_config(["backbone=efficientnet_lite0"], tmp_path))
    assert patch_ae_trainer.limit_train_batches == 1.0


@pytest.mark.parametrize(
    ("experiment", "jobs"),
    [("sweep_alpha", 5), ("sweep_cutpaste", 18), ("sweep_layers", 5), ("all_categories", 15)],
)
def test_sweeps_are_multiruns_of_the_expected_size(experiment, jobs, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path, hydra=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert job_count(cfg.hydra.sweeper.params) == jobs


def test_sweep_values(tmp_path):
    alpha = compose_config(["experiment=sweep_alpha"], tmp_path, hydra=True).hydra.sweeper.params[
        "loss.alpha"
    ]
    assert [float(v) for v in alpha.split(",")] == [0.0, 0.25, 0.5, 0.75, 1.0]
    categories = compose_config(
        ["experiment=all_categories"], tmp_path, hydra=True
    ).hydra.sweeper.params.category
    assert tuple(categories.split(",")) == MVTEC_CATEGORIES


def test_paper_experiment_is_the_papers_setting(tmp_path):
    cfg = compose_config(["experiment=paper"], tmp_path)
    assert cfg.backbone.name == "wide_resnet101_2"
    assert list(cfg.backbone.layers) == [2, 3]
    assert cfg.model._target_ == "patchae.models.PatchAEModule"
    assert cfg.augment._target_ == "patchae.data.CutPaste"
    assert (cfg.data.image_size, cfg.data.crop_size) == (256, 224)
    # The paper's bank (R, not averaged), not the framework's feature bank; named so in results.
    assert (cfg.model.bank_features, cfg.model.aggregate) == ("representation", "none")
    assert compose_config([], tmp_path).model.bank_features == "features"
    assert PatchAEModule("resnet18", pretrained=False, bank_features="representation").variant == "paper"
    assert PatchAEModule("resnet18", pretrained=False, bank_features="features").variant == "feature bank"
    # The command line still wins over the experiment's choices.
    assert (
        compose_config(["experiment=paper", "backbone=efficientnet_lite0"], tmp_path).backbone.name
        == "tf_efficientnet_lite0"
    )


def test_daad_paper_trains_the_papers_whole_loss(tmp_path):
    # L2 + adversarial + the discriminator-feature alignment; the CPU setting leaves the alignment out (ours)
    paper = compose_config(["experiment=daad_paper"], tmp_path).model
    assert paper.alignment_weight > 0 and paper.adversarial_weight > 0
    assert compose_config(["experiment=daad_cpu"], tmp_path).model.alignment_weight == 0


def test_optuna_sweeper_maximises_the_chosen_metric(tmp_path):
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    cfg = compose_config(["experiment=optuna", "optimized_metric=pixel_auroc"], tmp_path, hydra=True)
    assert cfg.optimized_metric == "pixel_auroc"
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize"
    assert sweeper.study_name == "optuna_bottle"
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    distributions = {o.key_or_group: create_optuna_distribution_from_override(o) for o in parsed}
    alpha, lr = distributions["loss.alpha"], distributions["optimizer.lr"]
    assert (alpha.low, alpha.high) == (0.0, 1.0)
    assert type(lr).__name__ == "LogUniformDistribution" and (lr.low, lr.high) == (1e-5, 1e-3)
    assert list(distributions["bank.coreset_ratio"].choices) == [0.01, 0.1, 0.25]


def test_slurm_launcher_config(tmp_path):
    cfg = compose_config(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], tmp_path, hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    params = OmegaConf.to_container(launcher, resolve=False)
    params.pop("_target_")
    assert instantiate(launcher) is not None  # submitit is installed; nothing is submitted until a sweep runs
    assert params["submitit_folder"].endswith("/.submitit/%j")


@pytest.mark.slow
def test_optuna_sweep_runs_and_reports_the_best_chosen_metric(tmp_path):
    sweep = tmp_path / "optuna"
    done = run_tiny_sweep(
        tmp_path, sweep, "experiment=optuna", "optimized_metric=aupro", "hydra.sweeper.n_trials=2"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    aupro = [json.loads(path.read_text())["aupro"] for path in sweep.glob("*/results.json")]
    assert len(aupro) == 2
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(aupro))
    assert set(best.best_params) == {
        "loss.alpha",
        "augment.probability",
        "optimizer.lr",
        "bank.coreset_ratio",
    }


def flat_settings(cfg) -> dict[str, object]:
    """Every leaf of the composed config (run paths left out), by its dotted key."""
    container = OmegaConf.to_container(cfg, resolve=True)
    settings: dict[str, object] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            settings[prefix[:-1]] = node

    walk(container, "")
    return {k: v for k, v in settings.items() if not k.startswith("paths") and "output_dir" not in k}


@pytest.mark.parametrize("option", options("ablation"))
def test_each_ablation_option_composes_and_changes_only_its_factor(option, tmp_path):
    base = flat_settings(compose_config(["backbone=efficientnet_lite0"], tmp_path))
    cfg = compose_config([f"ablation={option}", "backbone=efficientnet_lite0"], tmp_path)
    settings = flat_settings(cfg)
    changed = {  # a key only one side has counts once for its whole group (augment=none empties it)
        key if key in base and key in settings else key.split(".")[0]
        for key in base.keys() | settings.keys()
        if base.get(key) != settings.get(key)
    }
    # epochs_10 became the defaults; it stays an option for the README's ablation rows (experiment=previous_schedule)
    if option in ("defaults", "epochs_10"):
        assert not changed
    else:
        # One factor: the keys it sets and the model / data keys that mirror them.
        assert 1 <= len(changed) <= 6, changed
    build(cfg)


def test_ablation_experiment_sweeps_every_option_over_three_seeds(tmp_path):
    cfg = compose_config(["experiment=ablation"], tmp_path, hydra=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert dict(cfg.hydra.sweeper.params) == {"ablation": "glob(*)", "seed": "0,1,2"}
    assert {"defaults", "epochs_0", "epochs_30", "backbone_frozen", "score_reweight"} <= set(
        options("ablation")
    )
