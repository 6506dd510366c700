import csv
import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from conftest import TINY_SYNTHETIC
from patchae.errors import PatchAEError
from patchae.train import fit_and_test
from patchae.wandb_media import default_run_name, resolve_mode, roc_points, sweep_group

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = [
    *TINY_SYNTHETIC,
    "data.n_train=8",
    "data.n_test_good=4",
    "data.n_test_defect=4",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "bank.coreset_ratio=0.5",
    "+trainer.enable_model_summary=false",
]


@pytest.fixture
def no_wandb_account(tmp_path, monkeypatch):
    """No API key, no netrc, W&B's own files under tmp_path: a machine that never logged in."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


def test_mode_is_offline_without_an_account(no_wandb_account):
    assert resolve_mode("auto") == "offline"


def test_mode_follows_api_key_netrc_and_wandb_mode(no_wandb_account, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto") == "offline"  # an explicit WANDB_MODE wins
    assert resolve_mode("disabled") == "disabled"  # and an explicit config mode wins over both
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY")
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert resolve_mode("auto") == "online"  # `wandb login` writes this file
    with pytest.raises(PatchAEError, match="mode"):
        resolve_mode("cloud")


def test_roc_points_by_hand():
    # Scores 4 > 3 = 3 > 1 with labels 1, 1, 0, 0: the tie (one positive, one negative) is one step.
    fpr, tpr = roc_points(np.array([3.0, 1.0, 4.0, 3.0]), np.array([0, 0, 1, 1]))
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    # Raw distances far above a sigmoid's range stay distinct.
    fpr, tpr = roc_points(np.array([1000.0, 1001.0]), np.array([0, 1]))
    assert tpr.tolist() == [0.0, 1.0, 1.0] and fpr.tolist() == [0.0, 0.0, 1.0]


def test_names_outside_hydra_fall_back_to_the_defaults():
    assert sweep_group("sweep_alpha") == "sweep_alpha"
    assert default_run_name("bottle") == "bottle"


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (``run-<id>.wandb``: a header, then LevelDB-style log blocks)."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(raw):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        length, kind = struct.unpack("<HB", raw[position + 4 : position + 7])
        pending += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def logged_values(records: list, kind: str) -> dict[str, list]:
    values: dict[str, list] = {}
    for record in records:
        if record.WhichOneof("record_type") != kind:
            continue
        items = {
            "history": lambda r: r.history.item,
            "summary": lambda r: r.summary.update,
            "config": lambda r: r.config.update,
        }[kind](record)
        for item in items:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            values.setdefault(key, []).append(json.loads(item.value_json))
    return values


def test_offline_run_writes_metrics_media_and_summary_with_csv_and_tensorboard_beside(
    no_wandb_account, tmp_path
):
    out = tmp_path / "run"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *TINY,
                "logger=[csv,tensorboard,wandb]",
                "experiment_name=wandb_test",
                f"data.root={tmp_path / 'data'}",
                f"paths.output_dir={out}",
            ],
        )
    results = fit_and_test(cfg)

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (log_file,) = run_dir.glob("run-*.wandb")
    records = wandb_records(log_file)
    history, summary, config = (logged_values(records, kind) for kind in ("history", "summary", "config"))
    # Per-epoch loss, one value per epoch; test metrics equal to the run's results.
    assert len(history["train/loss_epoch"]) == 2
    assert history["test/image_auroc"][-1] == pytest.approx(results["image_auroc"])
    assert history["test/pixel_auroc"][-1] == pytest.approx(results["pixel_auroc"])
    # Summary and config carry what dashboards group by.
    assert summary["category"][-1] == "synthetic"
    assert summary["experiment"][-1] == "wandb_test"
    assert summary["image_auroc"][-1] == pytest.approx(results["image_auroc"])
    assert summary["train_seconds"][-1] > 0
    assert config["alpha"][-1] == pytest.approx(0.5)
    assert config["category"][-1] == "synthetic"
    assert config["model_name"][-1] == "PatchAEModule"
    assert config["model"][-1]["c3"] is None and "alpha" in config["model"][-1]  # the settings stay whole
    # Images with masks, overlays and the ROC table are files of the run.
    media = run_dir / "files" / "media"
    predictions = list((media / "images" / "test").glob("predictions_*.png"))
    overlays = list((media / "images" / "test").glob("anomaly_maps_*.png"))
    masks = list((media / "images" / "mask" / "test").glob("predictions_*.mask.png"))
    # Up to 2 images for each test type (good and the defect types), each with ground truth + prediction masks.
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    expected = sum(min(2, count) for count in Counter(row["defect_type"] for row in rows).values())
    assert expected >= 4
    assert len(predictions) == len(overlays) == expected
    all_masks = history["test/predictions/all_masks"][-1]
    assert len(all_masks) == expected
    assert all(set(masks_of_image) == {"ground_truth", "prediction"} for masks_of_image in all_masks)
    assert (
        masks
    )  # mask files are shared between images with identical masks (e.g. the empty one of good images)
    (roc_file,) = (media / "table" / "test").glob("roc_table_*.table.json")
    roc = json.loads(roc_file.read_text())
    assert roc["columns"] == ["fpr", "tpr"]
    assert roc["data"][0] == [0.0, 0.0] and roc["data"][-1] == [1.0, 1.0]
    # The other loggers wrote their files in the same run.
    assert "test/image_auroc" in (out / "csv" / "version_0" / "metrics.csv").read_text()
    assert list((out / "tensorboard" / "version_0").glob("events.out.tfevents.*"))
