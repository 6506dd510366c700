"""Reading checkpoints without running code, and converting older ones that need it.

A pickle can import and call anything, so a ``model.ckpt`` from someone else could run code on the machine that
opens it. Every checkpoint is read with ``torch.load(weights_only=True)``: only tensors and plain Python values
(dict, list, tuple, str, numbers, None) load; anything else ends with one line naming the file.

What patchae saves is made plain (:func:`to_plain`) before it is written, so its own checkpoints always pass.
A checkpoint written by an older version (or by hand) may hold other objects, such as OmegaConf containers in
its hyper-parameters. If you trust it, convert it once, which loads it the unsafe way a single time:

    python -m patchae.checkpoints convert old/model.ckpt [new/model.ckpt]
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import Container, OmegaConf

from patchae.errors import PatchAEError

_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


def convert_command(path: Path) -> str:
    return f"python -m patchae.checkpoints convert {path}"


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = True) -> Any:
    """``torch.load`` that refuses anything but tensors and plain values, with one-line errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PatchAEError(f"checkpoint {path} not found; pass ckpt=<run dir>/model.ckpt written by train.py")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise PatchAEError(refusal(path, error)) from None
        raise PatchAEError(unreadable(path, error)) from None
    except Exception as error:  # torch raises many kinds for foreign or damaged files
        raise PatchAEError(unreadable(path, error)) from None


def refusal(path: Path, error: Exception) -> str:
    """The one line for a checkpoint whose pickle asks for more than tensors and plain values."""
    return (
        f"refused checkpoint {path}: it holds {refused_objects(error)}, and loading it could run code; use a model.ckpt from a "
        f"source you trust, or if you trust this one (e.g. saved by an older patchae) convert it: "
        f"{convert_command(path)}"
    )


def refused_objects(error: Exception) -> str:
    found = _REFUSED_GLOBAL.search(str(error))
    return f"Python object {found.group(1)}" if found else "Python objects"


def unreadable(path: Path, error: Exception) -> str:
    reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
    return (
        f"cannot read checkpoint {path} ({reason}); it is damaged or not a PyTorch file: use a model.ckpt "
        "written by train.py"
    )


def to_plain(value: Any) -> Any:
    """``value`` with OmegaConf containers, paths and NumPy values turned into the plain Python values (and
    tensors) that a weights-only load accepts."""
    if isinstance(value, Container):
        return to_plain(OmegaConf.to_container(value, resolve=True))
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return {to_plain(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, tuple):  # named tuples too: their class would be a refused global
        return tuple(to_plain(item) for item in value)
    if isinstance(value, list):
        return [to_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def convert(source: str | Path, target: str | Path | None = None) -> Path:
    """Rewrites a trusted checkpoint so that it loads weights-only. This one load runs whatever the file holds."""
    source = Path(source).expanduser()
    target = Path(target).expanduser() if target is not None else source.with_suffix(".safe.ckpt")
    if not source.is_file():
        raise PatchAEError(f"checkpoint {source} not found; give the path of the model.ckpt to convert")
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as error:
        raise PatchAEError(unreadable(source, error)) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_plain(checkpoint), target)
    try:
        torch.load(target, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        target.unlink()
        raise PatchAEError(
            f"cannot convert checkpoint {source}: it holds {refused_objects(error)}, which has no plain "
            "equivalent; retrain with this patchae"
        ) from None
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m patchae.checkpoints", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert_parser = commands.add_parser(
        "convert", help="rewrite a trusted older checkpoint so that it loads without running code"
    )
    convert_parser.add_argument(
        "source", type=Path, help="the checkpoint to convert (it is loaded unsafely once)"
    )
    convert_parser.add_argument(
        "target", type=Path, nargs="?", help="default: <source stem>.safe.ckpt beside it"
    )
    args = parser.parse_args(argv)
    try:
        target = convert(args.source, args.target)
    except PatchAEError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {target}; use it in place of {args.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
