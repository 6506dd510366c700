"""Inference runtimes of predict.py: torch (the checkpoint's model) or ONNX Runtime (its exported graph).

``runtime=onnx`` exports the checkpoint once with :func:`patchae.deploy.export.export_model` (exact matmul search, the
same maps and scores to float rounding) to ``<checkpoint dir>/export/model.onnx``, reused while it is newer than
the checkpoint, and scores batches with ONNX Runtime on CPU. Thresholds stay in Python, so ``threshold=`` and
``threshold_method=`` overrides work as with torch.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from patchae.deploy.export import BANK_BLOCK, export_model
from patchae.errors import PatchAEError
from patchae.models.torch_model import CPU_MICRO_BATCH

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx")


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        hint = " (OpenVINO is not supported; use onnx)" if runtime == "openvino" else ""
        raise PatchAEError(f"runtime={runtime} is unknown{hint}; use one of {', '.join(RUNTIMES)}")
    return runtime


def onnx_file(ckpt: str | Path, bank_block: int | None = None) -> Path:
    """``model.onnx`` of a checkpoint: its earlier export when that is newer than the checkpoint, else a new one
    (in the checkpoint's ``export/`` folder, or a temporary folder when that is not writable)."""
    ckpt = Path(ckpt).expanduser()
    folder = ckpt.parent / "export"
    path = folder / "model.onnx"
    if path.is_file() and path.stat().st_mtime >= ckpt.stat().st_mtime and _exported_from(folder, ckpt):
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="patchae_onnx_"))
    log.info("runtime=onnx: exporting %s to %s", ckpt, folder / "model.onnx")
    return Path(
        export_model(ckpt, folder, format="onnx", bank_block=bank_block or BANK_BLOCK, check=False)["onnx"]
    )


def _exported_from(folder: Path, ckpt: Path) -> bool:
    try:
        recorded = json.loads((folder / "export.json").read_text()).get("checkpoint")
    except (OSError, ValueError):
        return False
    return recorded is not None and Path(recorded).expanduser().resolve() == ckpt.resolve()


class OnnxScorer:
    """``scorer(images) -> (maps (B, H, W), image scores (B,))`` with ONNX Runtime, as the torch model; on CPU, or
    with ``device="cuda"`` on the GPU (needs the onnxruntime-gpu package; inputs are copied from the host)."""

    def __init__(self, path: str | Path, threads: int | None = None, device: str = "cpu") -> None:
        try:
            import onnxruntime
        except ImportError:
            raise PatchAEError("runtime=onnx needs onnxruntime: pip install onnxruntime") from None
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise PatchAEError(
                    "this ONNX Runtime has no CUDA provider; pip install onnxruntime-gpu for ONNX on the GPU"
                )
            providers.insert(0, "CUDAExecutionProvider")
        elif device != "cpu":
            raise PatchAEError(f"ONNX Runtime device {device!r} is not cpu or cuda")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for bad files
            reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
            raise PatchAEError(
                f"cannot load {path} ({reason}); delete it so that runtime=onnx exports the checkpoint again"
            ) from None
        self.input_name = self.session.get_inputs()[0].name
        self.on_gpu = device == "cuda"

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = np.ascontiguousarray(images.detach().cpu().float().numpy())
        # On CPU a few images at a time, as the torch model: at batch 32 that ran 1.4x faster and peaked 600 MB
        # lower (its activations stay small and reused; docs/results.md). On the GPU the whole batch at once.
        step = max(1, len(batch)) if self.on_gpu else CPU_MICRO_BATCH
        parts = [
            self.session.run(["anomaly_maps", "image_scores"], {self.input_name: batch[start : start + step]})
            for start in range(0, len(batch), step) or [0]
        ]
        maps, scores = (np.concatenate([part[k] for part in parts]) for k in (0, 1))
        return torch.from_numpy(maps), torch.from_numpy(scores)
