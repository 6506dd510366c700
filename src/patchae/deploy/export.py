"""Export a trained model (encoder + memory bank + scoring) to TorchScript and ONNX.

``python export.py ckpt=<model.ckpt> [format=both|onnx|torchscript] [output=<dir>]`` writes
``model.onnx`` / ``model.torchscript.pt`` and ``export.json`` (preprocessing, threshold, I/O names), then
checks that the exported files score like the checkpoint (``check=true``).

The exported graph takes a normalised ``(B, 3, H, W)`` batch (H, W fixed: the model input it was trained with,
after resize, padding and crop; B is dynamic) and returns ``anomaly_maps (B, H, W)``, raw ``image_scores (B,)``
and ``normalized_scores (B,)`` (0.5 = the checkpoint's threshold). A model trained with ``data.tiling`` cuts
and stitches its tiles inside the graph. Nearest-neighbour search is exact and matmul-based: the bank is scanned in
fixed-size blocks (``|q|^2 - 2 q.b + |b|^2``, running top-k), then the distances of the chosen neighbours are
recomputed directly, as :func:`patchae.memory.torch_nearest` and the faiss path do, so scores agree with the
checkpoint to float rounding.
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
import torch.nn.functional as F
from lightning import LightningModule
from omegaconf import OmegaConf
from torch import Tensor, nn

from patchae.data.transforms import ImageTransform
from patchae.deploy.loading import load_model, pick_thresholds
from patchae.errors import PatchAEError
from patchae.models.base import AnomalyModule
from patchae.scoring.maps import MAX_OPERATOR_SIDE, blur_kernel_size, image_scores, map_operator
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


def nearest_bank_distances(queries: Tensor, bank: Tensor, bank_sq: Tensor, k: int, block: int) -> Tensor:
    """Mean Euclidean distance of each query (B, N, D) to its k nearest bank rows -> (B, N).

    The bank (M, D) is fixed when exporting, so the Python loop over its blocks unrolls into a static graph
    while B stays dynamic. Working memory: B x N x block floats. The candidates are ranked by |b|^2 - 2 q.b
    (|q|^2 is the same for every row of the bank), with the -2 applied to the queries, so each block costs
    one matrix product and one addition over B x N x block. (ONNX Runtime's TopK with k = 1 was faster than
    ReduceMin + ArgMin.)
    """
    scaled = -2.0 * queries
    best_d = torch.empty(0)
    best_i = torch.empty(0)
    num_bank = bank.shape[0]
    for start in range(0, num_bank, block):
        stop = min(start + block, num_bank)
        partial = torch.matmul(scaled, bank[start:stop].t()) + bank_sq[start:stop]
        block_d, block_i = torch.topk(partial, min(k, stop - start), dim=-1, largest=False)
        block_i = block_i + start
        if start == 0:
            best_d, best_i = block_d, block_i
        elif k == 1:
            better = block_d < best_d
            best_d, best_i = torch.where(better, block_d, best_d), torch.where(better, block_i, best_i)
        else:
            merged_d, position = torch.topk(torch.cat([best_d, block_d], dim=-1), k, dim=-1, largest=False)
            best_i = torch.gather(torch.cat([best_i, block_i], dim=-1), -1, position)
            best_d = merged_d
    difference = bank[best_i] - queries.unsqueeze(2)  # (B, N, k, D): exact distances of the chosen ones
    return (difference * difference).sum(dim=-1).sqrt().mean(dim=-1)


class GaussianBlur(nn.Module):
    """The blur of :func:`patchae.scoring.maps.anomaly_maps` (same kernel, reflect padding) with the kernel as a
    buffer, so ONNX sees a convolution of known shape; separable: two 1-D passes."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        size = blur_kernel_size(sigma)
        half = (size - 1) * 0.5
        density = torch.exp(-0.5 * (torch.linspace(-half, half, size) / sigma) ** 2)
        kernel = density / density.sum()
        self.register_buffer("kernel_rows", kernel.view(1, 1, size, 1))
        self.register_buffer("kernel_cols", kernel.view(1, 1, 1, size))
        self.padding = size // 2

    def forward(self, maps: Tensor) -> Tensor:
        padded = F.pad(maps, [self.padding] * 4, mode="reflect")
        return F.conv2d(F.conv2d(padded, self.kernel_rows), self.kernel_cols)


class ExportableScorer(nn.Module):
    """The whole scoring path of an :class:`AnomalyModule` as one traceable module."""

    def __init__(self, model: AnomalyModule, thresholds: Thresholds, bank_block: int = BANK_BLOCK) -> None:
        super().__init__()
        if not model.is_fitted:
            raise PatchAEError(
                "the model has no memory bank to export; export a model.ckpt of a finished run"
            )
        if model.image_score == "reweight":
            raise PatchAEError(
                "image_score=reweight (PatchCore's Eq. 7) cannot be exported; retrain with scoring.image_score=max or topk"
            )
        self.model = model.eval()
        self.image_score, self.top_k = model.image_score, model.top_k
        bank = model.memory_bank.float()  # empty for reconstruction models (scores_by_bank False)
        self.register_buffer("bank_sq", (bank * bank).sum(dim=1))
        self.k = int(model.hparams.get("num_neighbors", 1))  # reconstruction models have no neighbours
        sigma = float(model.hparams.blur_sigma)
        self.blur = GaussianBlur(sigma) if sigma > 0 else nn.Identity()
        self.bank_block = int(bank_block)
        self.threshold = float(thresholds.value)
        self.scale = float(thresholds.scale)
        self.register_buffer("map_rows", None)
        self.register_buffer("map_cols", None)
        size = input_shape(model)
        if model.scores_by_bank and model.tiling is None and max(size) <= MAX_OPERATOR_SIDE:
            # Upsampling and blur as two matmuls (patchae.scoring.maps.anomaly_maps), ~100x faster in ONNX Runtime than
            # a convolution; the operators are made here, not while tracing, so the graph holds them as constants.
            with torch.no_grad():
                grid = model.embed(torch.zeros(1, 3, *size, device=model.device)).shape[-2:]
            # Copies: the operators are cached, and a traced module may not hold one tensor twice.
            self.map_rows = map_operator(int(grid[0]), size[0], sigma).clone().to(model.device)
            self.map_cols = map_operator(int(grid[1]), size[1], sigma).clone().to(model.device)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not self.model.scores_by_bank:  # SSL-AE, DAAD: their unblurred map at input resolution
            maps = self.blur(self.model.patch_scores(images).unsqueeze(1)).squeeze(1)
            scores = image_scores(maps, self.image_score, self.top_k)
            return maps, scores, normalize_scores(scores, self.threshold, self.scale)
        tiling = self.model.tiling
        embedding = self.model.embed(self.model.tiles(images))
        height, width = embedding.shape[-2:]
        queries = embedding.flatten(2).transpose(1, 2)
        distances = nearest_bank_distances(
            queries, self.model.memory_bank, self.bank_sq, self.k, self.bank_block
        )
        patch_scores = distances.reshape(-1, 1, height, width)
        if self.map_rows is not None:
            maps = self.map_rows @ patch_scores.squeeze(1) @ self.map_cols.t()
        elif tiling is None:
            maps = F.interpolate(patch_scores, size=images.shape[-2:], mode="bilinear", align_corners=False)
            maps = self.blur(maps).squeeze(1)
        else:
            size = (tiling.tile, tiling.tile)
            tile_maps = F.interpolate(patch_scores, size=size, mode="bilinear", align_corners=False)
            maps = tiling.stitch(tile_maps.squeeze(1), *images.shape[-2:]).unsqueeze(1)
            maps = self.blur(maps).squeeze(1)
        scores = image_scores(maps, self.image_score, self.top_k)
        return maps, scores, normalize_scores(scores, self.threshold, self.scale)


def input_shape(model: AnomalyModule) -> tuple[int, int]:
    """``(H, W)`` of the model input the checkpoint was trained with (the exported graph's fixed size)."""
    return ImageTransform.from_hparams(model.hparams).output_shape


def metadata(model: AnomalyModule, thresholds: Thresholds, ckpt: str | Path) -> dict[str, Any]:
    """What a deployment needs besides the graph: preprocessing, threshold, I/O names."""
    hparams = model.hparams
    return {
        "checkpoint": str(ckpt),
        "model": type(model).__name__,
        "backbone": hparams.get("backbone"),
        "input": {
            "name": INPUT_NAMES[0],
            "shape": ["batch", 3, *input_shape(model)],
            "dtype": "float32",
            "preprocessing": {
                "image_size": hparams.image_size,
                "crop_size": hparams.get("crop_size"),
                "resize_mode": hparams.get("resize_mode") or "squash",
                "mean": list(hparams.mean),
                "std": list(hparams.std),
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
        "bank_size": int(model.memory_bank.shape[0]),
        "onnx_opset": ONNX_OPSET,
    }


@contextmanager
def exporting() -> Iterator[None]:
    """Lightning's ``trainer`` property raises on a detached module, and the tracer reads every attribute:
    the flag Lightning itself sets in ``to_torchscript`` makes it return None instead."""
    previous = LightningModule._jit_is_scripting
    LightningModule._jit_is_scripting = True
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Tracer warnings about shape-derived Python ints (the batch axis stays dynamic) and deprecations.
            warnings.simplefilter("ignore")
            yield
    finally:
        LightningModule._jit_is_scripting = previous


def export_torchscript(scorer: ExportableScorer, example: Tensor, path: Path, extra: dict[str, Any]) -> Path:
    with exporting():
        warnings.simplefilter("ignore")  # tracer warnings about shape-derived Python ints: B stays dynamic
        traced = torch.jit.trace(scorer, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"patchae.json": json.dumps(extra)})
    return path


def export_onnx(scorer: ExportableScorer, example: Tensor, path: Path, extra: dict[str, Any]) -> Path:
    dynamic = {name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES}
    with exporting():
        torch.onnx.export(
            scorer,
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
    scorer = ExportableScorer(model, thresholds, bank_block)
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
        path = export(scorer, example, output / filename, extra)
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
