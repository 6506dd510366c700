"""DRAEM benchmark (anomalib 2.7): procedural textures, one-line errors, and (with anomalib) a 1-epoch run."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from patchae.benchmarks.draem import (
    ANOMALIB_HINT,
    MODEL_NAME,
    PROCEDURAL,
    TEXTURE_KINDS,
    DraemConfig,
    generate_textures,
    main,
    matched_brightness,
    run,
    summary,
    texture_source,
)
from patchae.data.synthetic import generate_synthetic_category
from patchae.errors import PatchAEError


def test_procedural_textures_are_readable_and_deterministic(tmp_path):
    paths = generate_textures(tmp_path / "a", count=6, size=48, seed=3)
    assert len(paths) == 6 and len(list((tmp_path / "a").glob("*.png"))) == 6
    arrays = [np.asarray(Image.open(path)) for path in paths]
    assert all(array.shape == (48, 48, 3) and array.dtype == np.uint8 for array in arrays)
    assert all(array.std() > 0 for array in arrays)  # patterned, not flat
    assert {path.stem.split("_", 1)[1] for path in paths} == set(TEXTURE_KINDS)
    again = generate_textures(tmp_path / "b", count=6, size=48, seed=3)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    other = generate_textures(tmp_path / "c", count=6, size=48, seed=4)
    assert [p.read_bytes() for p in paths] != [p.read_bytes() for p in other]


def test_brightness_matching_undoes_a_global_gain():
    # The brightness control's test images: a part lit 10 % darker or brighter comes back as the same image.
    image = (
        torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.6
    )  # mean 0.3: no clipping at 0.4
    for gain in (0.9, 1.1):
        matched = matched_brightness(image * gain, 0.4)
        assert float(matched.mean()) == pytest.approx(0.4, abs=1e-6)
        assert torch.allclose(matched, matched_brightness(image, 0.4), atol=1e-6)
    assert float(matched_brightness(image, 0.95).max()) == 1.0  # clipped to the valid range


def test_textures_are_generated_once_and_rebuilt_for_other_settings(tmp_path):
    paths = generate_textures(tmp_path, count=4, size=32, seed=0)
    stamp = paths[0].stat().st_mtime_ns
    assert generate_textures(tmp_path, count=4, size=32, seed=0) == paths
    assert paths[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    assert len(generate_textures(tmp_path, count=2, size=32, seed=0)) == 2
    assert len(list(tmp_path.glob("*.png"))) == 2  # no stale images left for DRAEM to read


def test_missing_category_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([f"root={tmp_path}", "category=nothing", f"out={tmp_path / 'out'}"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: category folder") and "root=" in err


def test_bad_argument_and_missing_or_empty_textures_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["epochs=many"])
    assert capsys.readouterr().err.startswith("error: bad argument")
    # anomalib's Draem downloads DTD when its folder is missing: such a folder must stop the run first.
    with pytest.raises(PatchAEError, match="textures folder .* not found"):
        texture_source(DraemConfig(textures=str(tmp_path / "none")), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PatchAEError, match="no images in textures folder"):
        texture_source(DraemConfig(textures=str(tmp_path / "empty")), tmp_path)
    generate_textures(tmp_path / "mine", count=2, size=32)
    source = texture_source(DraemConfig(textures=str(tmp_path / "mine")), tmp_path)
    assert source["source"] == "user folder" and source["images"] == 2


def test_without_anomalib_says_how_to_install(tmp_path, monkeypatch, capsys):
    for name in ("anomalib", "anomalib.data", "anomalib.engine", "anomalib.models"):
        monkeypatch.setitem(sys.modules, name, None)  # `import anomalib...` now raises ImportError
    generate_synthetic_category(tmp_path / "data", n_train=2, n_test_good=1, n_test_defect=1, image_size=32)
    with pytest.raises(SystemExit):
        main([f"root={tmp_path / 'data'}", "category=synthetic", f"out={tmp_path / 'out'}"])
    assert capsys.readouterr().err.strip() == f"error: {ANOMALIB_HINT}"


@pytest.mark.slow
def test_draem_one_epoch_on_a_tiny_category(tmp_path):
    pytest.importorskip("anomalib")
    generate_synthetic_category(tmp_path / "data", n_train=8, n_test_good=3, n_test_defect=4, image_size=64)
    cfg = DraemConfig(
        root=str(tmp_path / "data"),
        category="synthetic",
        image_size=64,
        epochs=1,
        n_textures=4,
        texture_size=64,
        num_workers=0,
        accelerator="cpu",
        out=str(tmp_path / "out"),
    )
    results = run(cfg)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "fit_seconds", "train_seconds"):
        assert key in written
    assert written["model"] == MODEL_NAME and written["category"] == "synthetic" and written["seed"] == 0
    assert written["image_size"] == 64 and written["epochs"] == 1 and written["test_images"] == 7
    assert written["textures"]["source"] == PROCEDURAL and written["textures"]["images"] == 4
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= written[key] <= 1.0, key
    assert written["fit_seconds"] > 0 and not list((tmp_path / "out").rglob("*.ckpt"))
    predictions = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert predictions[0] == "path,label,score" and len(predictions) == 1 + 7
    assert "image AUROC" in summary(results) and math.isfinite(results["image_auroc"])
    control = written["brightness_matched"]
    assert 0.0 < control["train_brightness"] < 1.0 and 0.0 <= control["image_auroc"] <= 1.0
    assert "at the training brightness" in summary(results)
