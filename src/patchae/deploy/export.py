"""Export a trained model (encoder + memory bank + scoring) to TorchScript and ONNX.

``python export.py ckpt=<model.ckpt> [format=both|onnx|torchscript] [output=<dir>]`` writes
``model.onnx`` / ``model.torchscript.pt`` and ``export.json`` (preprocessing, threshold, I/O names), then
checks that the exported files score like the checkpoint (``check=true``).

The exported graph is the trace of the model's own torch module (``model.model``: network + scorer, the same
code training, testing and predict run; :mod:`patchae.models.torch_model`). It takes a normalised
``(B, 3, H, W)`` batch (H, W fixed: the model input it was trained with, after resize, padding and crop; B is
dynamic) and returns ``anomaly_maps (B, H, W)``, raw ``image_scores (B,)`` and ``normalized_scores (B,)``
(0.5 = the checkpoint's threshold). A model trained with ``data.tiling`` cuts and stitches its tiles inside the
graph. The bank is searched with the exact torch search (:func:`patchae.memory.torch_nearest`) in blocks of
``bank_block`` rows, so scores agree with the checkpoint to float rounding.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from patchae.data.transforms import ImageTransform
from patchae.deploy.loading import load_model, pick_thresholds
from patchae.errors import PatchAEError
from patchae.models.base import AnomalyModule
from patchae.scoring import BankScorer
from patchae.thresholds import Thresholds, normalize_scores

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "both")
INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["anomaly_maps", "image_scores", "normalized_scores"]
ONNX_OPSET = 17
TOLERANCE = 1e-4
# Bank rows per distance block of the graph. Measured with ONNX Runtime on 2 CPU cores, bank 14,739 x 152:
# 512-row blocks scored 1.4x faster than the former 4096 at batch 1 and 32, in half the memory.
BANK_BLOCK = 512


class ExportedModel(nn.Module):
    """What the exported graph computes: the model's own torch module (network + scorer, the code training,
    testing and predict run) and the checkpoint's threshold as a normalised score. The scorer searches its
    bank with the exact blocked torch search, which the tracer unrolls over the fixed bank."""

    def __init__(self, model: AnomalyModule, thresholds: Thresholds, bank_block: int = BANK_BLOCK) -> None:
        super().__init__()
        if not model.is_fitted:
            raise PatchAEError(
                "the model has no memory bank to export; export a model.ckpt of a finished run"
            )
        if model.scoring.image_score == "reweight":
            raise PatchAEError(
                "image_score=reweight (PatchCore's Eq. 7) cannot be exported; retrain with scoring.image_score=max or topk"
            )
        self.model = model.model.eval()
        scorer = self.model.scorer
        if isinstance(scorer, BankScorer):
            if scorer.settings.search != "torch":
                raise PatchAEError("export needs the torch search: load the model with search='torch'")
            scorer.block_rows = int(bank_block)
        self.threshold = float(thresholds.value)
        self.scale = float(thresholds.scale)
        # One eager pass makes the map operators (patchae.scoring.maps.map_operator, cached per size), so that
        # the tracer finds them ready and keeps them as constants instead of recording how they were made.
        with torch.no_grad():
            self.model(torch.zeros(1, 3, *input_shape(model), device=model.device))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        maps, scores = self.model(images)
        return maps, scores, normalize_scores(scores, self.threshold, self.scale)


def input_shape(model: AnomalyModule) -> tuple[int, int]:
    """``(H, W)`` of the model input the checkpoint was trained with (the exported graph's fixed size)."""
    return ImageTransform.from_preprocessing(model.preprocessing).output_shape


def metadata(model: AnomalyModule, thresholds: Thresholds, ckpt: str | Path) -> dict[str, Any]:
    """What a deployment needs besides the graph: preprocessing, threshold, I/O names."""
    preprocessing = model.preprocessing
    return {
        "checkpoint": str(ckpt),
        "model": type(model).__name__,
        "backbone": model.hparams.get("backbone"),
        "input": {
            "name": INPUT_NAMES[0],
            "shape": ["batch", 3, *input_shape(model)],
            "dtype": "float32",
            "preprocessing": {
                "image_size": preprocessing.image_size,
                "crop_size": preprocessing.crop_size,
                "resize_mode": preprocessing.resize_mode or "squash",
                "mean": list(preprocessing.mean),
                "std": list(preprocessing.std),
                "steps": "RGB, resize to image_size (int: square, or [height, width]; bilinear, antialiased): "
                "squash stretches to it, keep_aspect scales to fit inside it and pads the rest centred with "
                "the mean colour; centre crop to crop_size; scale to [0, 1], (x - mean) / std; the map's "
                "padding is dropped and the rest resized back to the image",
            },
            "tiling": model.tiling.as_config() if model.tiling is not None else None,
        },
        "outputs": OUTPUT_NAMES,
        "threshold": {
            "method": thresholds.method,
            "value": thresholds.value,
            "normalization_scale": thresholds.scale,
            "rule": "anomalous when image_score >= value (normalized_score 0.5)",
        },
        "bank_size": model.bank_size,
        "onnx_opset": ONNX_OPSET,
    }


@contextmanager
def exporting() -> Iterator[None]:
    """No gradients, and no tracer warnings about shape-derived Python ints (the batch axis stays dynamic)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_torchscript(exported: ExportedModel, example: Tensor, path: Path, extra: dict[str, Any]) -> Path:
    with exporting():
        traced = torch.jit.trace(exported, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"patchae.json": json.dumps(extra)})
    return path


def export_onnx(exported: ExportedModel, example: Tensor, path: Path, extra: dict[str, Any]) -> Path:
    dynamic = {name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES}
    with exporting():
        torch.onnx.export(
            exported,
            (example,),
            str(path),
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes=dynamic,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    try:
        import onnx

        graph = onnx.load(str(path))
        for key, value in {"patchae": json.dumps(extra)}.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, str(path))
    except ImportError:  # the graph is fine without its metadata; export.json has it too
        log.warning("the onnx package is missing: metadata only in export.json")
    return path


def run_torchscript(path: Path, images: Tensor) -> tuple[Tensor, ...]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of torch.export
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return tuple(output.cpu() for output in module(images))


def run_onnx(path: Path, images: Tensor) -> tuple[Tensor, ...]:
    try:
        import onnxruntime
    except ImportError:
        raise PatchAEError(
            "checking an ONNX export needs onnxruntime: pip install onnxruntime, or check=false"
        ) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: images.numpy()})
    return tuple(torch.from_numpy(np.asarray(output)) for output in outputs)


def max_differences(reference: tuple[Tensor, ...], exported: tuple[Tensor, ...]) -> dict[str, float]:
    """Largest difference per output, relative to the output's scale (its largest magnitude, at least 1):
    float32 distances of a few units differ in the 1e-5 range between runtimes."""
    return {
        name: float((a.double() - b.double()).abs().max() / max(1.0, float(a.double().abs().max())))
        for name, a, b in zip(OUTPUT_NAMES, reference, exported, strict=True)
    }


@torch.no_grad()
def reference_outputs(model: AnomalyModule, thresholds: Thresholds, images: Tensor) -> tuple[Tensor, ...]:
    """What the checkpoint's model says on ``images`` (with the search it was loaded with)."""
    maps, scores = model(images.to(model.device))
    return maps.cpu(), scores.cpu(), thresholds.normalize(scores).cpu()


@dataclass
class ExportConfig:
    """``python export.py key=value ...`` (an omegaconf structured config)."""

    ckpt: str = "???"
    output: str | None = None  # default: <checkpoint dir>/export
    format: str = "both"  # onnx | torchscript | both
    batch_size: int = 2  # example batch used for tracing (the batch axis stays dynamic)
    # Bank rows per distance block in the graph (memory: B x patches x block floats).
    bank_block: int = BANK_BLOCK
    check: bool = True  # compare the exported files with the checkpoint on the example batch
    threshold: float | None = None
    threshold_method: str | None = None


def export_model(
    ckpt: str | Path,
    output: str | Path | None = None,
    format: str = "both",
    batch_size: int = 2,
    bank_block: int = BANK_BLOCK,
    check: bool = True,
    threshold: float | None = None,
    threshold_method: str | None = None,
    example: Tensor | None = None,
) -> dict[str, Any]:
    """Export a checkpoint; returns the paths written and, with ``check``, the largest output differences."""
    if format not in FORMATS:
        raise PatchAEError(f"format={format} is unknown; use one of {', '.join(FORMATS)}")
    for name, value in (("batch_size", batch_size), ("bank_block", bank_block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PatchAEError(f"{name}={value!r} must be a positive integer")
    ckpt = Path(ckpt).expanduser()
    # Exact torch search, as in the exported graph: a checkpoint with an approximate faiss index (ivf, ivfpq)
    # would otherwise be compared with different neighbours.
    model = load_model(ckpt, device="cpu", search="torch")
    thresholds = pick_thresholds(model.thresholds, threshold, threshold_method, source=f"checkpoint {ckpt}")
    output = Path(output).expanduser() if output else ckpt.parent / "export"
    output.mkdir(parents=True, exist_ok=True)
    if example is None:
        example = torch.randn(batch_size, 3, *input_shape(model), generator=torch.Generator().manual_seed(0))
    exported = ExportedModel(model, thresholds, bank_block)
    extra = metadata(model, thresholds, ckpt)
    (output / "export.json").write_text(json.dumps(extra, indent=2))
    result: dict[str, Any] = {"export_json": str(output / "export.json")}
    reference = reference_outputs(model, thresholds, example) if check else None
    exporters = {
        "torchscript": (export_torchscript, run_torchscript, "model.torchscript.pt"),
        "onnx": (export_onnx, run_onnx, "model.onnx"),
    }
    for name, (export, run_exported, filename) in exporters.items():
        if format not in (name, "both"):
            continue
        path = export(exported, example, output / filename, extra)
        result[name] = str(path)
        if reference is not None:
            differences = max_differences(reference, run_exported(path, example))
            result[f"{name}_max_difference"] = differences
            if max(differences.values()) > TOLERANCE:
                raise PatchAEError(
                    f"{path} disagrees with {ckpt} by up to {max(differences.values()):.2e} of the output's scale "
                    f"(> {TOLERANCE}); report this as a bug"
                )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: ``key=value`` arguments as in predict.py."""
    args = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in args):
        print(__doc__)
        print(OmegaConf.to_yaml(OmegaConf.structured(ExportConfig)))
        sys.exit(0)
    try:
        try:
            cfg = OmegaConf.merge(OmegaConf.structured(ExportConfig), OmegaConf.from_dotlist(args))
        except Exception as error:  # omegaconf's errors for unknown keys and wrong types
            raise PatchAEError(
                f"bad argument ({str(error).splitlines()[0]}); use key=value with keys of: python export.py --help"
            ) from None
        if OmegaConf.is_missing(cfg, "ckpt"):
            raise PatchAEError("ckpt=<model.ckpt> is required")
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        result = export_model(**OmegaConf.to_container(cfg))
    except PatchAEError as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
    for name in ("torchscript", "onnx"):
        if name in result:
            difference = result.get(f"{name}_max_difference")
            agreement = (
                f" (max |difference| to the checkpoint: {max(difference.values()):.2e})" if difference else ""
            )
            print(f"{name}: {result[name]}{agreement}")
    print(f"metadata: {result['export_json']}")
    return result


if __name__ == "__main__":
    main()
