"""Checkpoints load weights-only: a file that would run code is refused with one line naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

from checkpoint_fixture import session_checkpoint_fixture
from conftest import REPO, TINY_RUN
from patchae import checkpoints
from patchae.deploy.export import export_model
from patchae.deploy.loading import checkpoint_class, load_model, read_checkpoint
from patchae.errors import PatchAEError
from patchae.models.base import CHECKPOINT_KEY
from patchae.train import fit_and_test

trained = session_checkpoint_fixture()


class RunsCode:
    """Unpickles into a call of ``exec`` that writes ``marker``: what a malicious model.ckpt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.fixture
def malicious(trained, tmp_path) -> tuple[Path, Path]:
    """(a real checkpoint with a code-running object added, the file that object would create)."""
    marker = tmp_path / "code_ran"
    checkpoint = torch.load(trained.ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["backbone_name"] = RunsCode(marker)
    path = tmp_path / "evil" / "model.ckpt"
    path.parent.mkdir()
    torch.save(checkpoint, path)
    return path, marker


def test_the_malicious_checkpoint_really_runs_code_when_unpickled(malicious):
    path, marker = malicious
    torch.load(path, weights_only=False)  # what predict.py did before
    assert marker.read_text() == "ran"


def refused(path: Path) -> str:
    return rf"^refused checkpoint {path}: it holds Python object exec, and loading it could run code; .*" + (
        rf"convert it: python -m patchae\.checkpoints convert {path}$"
    )


def test_malicious_checkpoint_is_refused_without_running_it(malicious):
    path, marker = malicious
    for load in (read_checkpoint, load_model, export_model):
        with pytest.raises(PatchAEError, match=refused(path)):
            load(path)
    assert not marker.exists()


def test_predict_command_refuses_it_in_one_line(malicious, trained):
    path, marker = malicious
    image = next((trained.data_dir / "test" / "good").glob("*.png"))
    result = subprocess.run(
        [sys.executable, "predict.py", f"ckpt={path}", f"input={image}", f"output={path.parent / 'out'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"error: refused checkpoint {path}: it holds Python object exec"
    )
    assert not marker.exists()


def test_resuming_from_a_malicious_checkpoint_is_refused(malicious, tmp_path):
    path, marker = malicious
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *TINY_RUN,
                f"paths.output_dir={tmp_path / 'run'}",
                f"data.root={tmp_path / 'data'}",
                f"ckpt_path={path}",
            ],
        )
    with pytest.raises(PatchAEError, match=refused(path)):
        fit_and_test(cfg)
    assert not marker.exists()


def test_damaged_checkpoint_names_the_file(trained, tmp_path):
    path = tmp_path / "damaged.ckpt"
    data = bytearray(trained.ckpt.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(
        PatchAEError, match=rf"^cannot read checkpoint {path} \(.*\); it is damaged or not a PyTorch"
    ):
        read_checkpoint(path)


def test_checkpoint_naming_a_class_outside_patchae_is_refused_before_importing(trained, tmp_path):
    checkpoint = read_checkpoint(trained.ckpt)
    checkpoint[CHECKPOINT_KEY]["model_class"] = "antigravity.Fly"  # importing antigravity opens a browser
    with pytest.raises(PatchAEError, match=r"names antigravity\.Fly, which is not a patchae model; refused$"):
        checkpoint_class(checkpoint, tmp_path / "model.ckpt")
    assert "antigravity" not in sys.modules


def test_what_training_saves_loads_weights_only(trained):
    checkpoint = torch.load(trained.ckpt, weights_only=True)
    assert isinstance(checkpoint["hyper_parameters"]["layers"], list)
    model = load_model(trained.ckpt)
    assert model.is_fitted and model.thresholds.is_set


def test_to_plain_turns_config_objects_into_plain_values(tmp_path):
    value = {
        "layers": ListConfig([2, 3]),
        "cutpaste": DictConfig({"area_ratio": [0.02, 0.15]}),
        "mean": (0.485, 0.456, 0.406),
        "root": Path("/data"),
        "scale": np.float32(0.5),
        "weights": torch.ones(2),
    }
    plain = checkpoints.to_plain(value)
    assert plain["layers"] == [2, 3] and type(plain["layers"]) is list
    assert plain["cutpaste"] == {"area_ratio": [0.02, 0.15]} and type(plain["cutpaste"]) is dict
    assert plain["mean"] == (0.485, 0.456, 0.406) and plain["root"] == "/data"
    assert plain["scale"] == 0.5 and type(plain["scale"]) is float
    torch.save(plain, tmp_path / "plain.pt")
    again = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert torch.equal(again["weights"], torch.ones(2)) and again["layers"] == [2, 3]


def test_old_checkpoint_with_config_objects_is_refused_then_converted(trained, tmp_path):
    # Older versions could save OmegaConf containers among the hyper-parameters.
    checkpoint = torch.load(trained.ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["layers"] = OmegaConf.create(checkpoint["hyper_parameters"]["layers"])
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    with pytest.raises(
        PatchAEError, match=r"holds Python object omegaconf\.listconfig\.ListConfig, .* convert it"
    ):
        load_model(old)
    assert checkpoints.main(["convert", str(old)]) == 0
    converted = tmp_path / "old.safe.ckpt"
    images = torch.rand(2, 3, 64, 64)
    maps, scores = load_model(converted)(images)
    reference_maps, reference_scores = load_model(trained.ckpt)(images)
    assert torch.equal(scores, reference_scores) and torch.equal(maps, reference_maps)


def test_converting_a_file_that_is_not_there_is_one_line(tmp_path, capsys):
    assert checkpoints.main(["convert", str(tmp_path / "missing.ckpt")]) == 1
    assert (
        capsys.readouterr().err
        == f"error: checkpoint {tmp_path / 'missing.ckpt'} not found; give the path of the model.ckpt to convert\n"
    )
