"""The command line of the benchmark modules: ``key=value`` arguments into a structured config, one-line errors."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from patchae.errors import PatchAEError


def project_root() -> Path:
    """The source checkout holding ``train.py`` and ``conf/``: the benchmarks run its entry points and configs."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "train.py").is_file() or not (root / "conf").is_dir():
        raise PatchAEError(
            f"train.py and conf/ not found in {root}; run the benchmark from a source checkout"
        )
    return root


def run_command(
    module: str,
    doc: str,
    config_class: type,
    run: Callable[[Any], dict[str, Any]],
    format_results: Callable[[dict[str, Any]], str],
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``python -m <module> key=value ...``: ``run`` the merged config, print ``format_results`` of its results
    and write them as JSON to the config's ``output`` when it names a file. ``--help`` prints ``doc`` and the
    keys with their defaults; a bad argument or a :class:`PatchAEError` exits with one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in args):
        print(doc)
        print(OmegaConf.to_yaml(OmegaConf.structured(config_class)))
        sys.exit(0)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        try:
            cfg = OmegaConf.merge(OmegaConf.structured(config_class), OmegaConf.from_dotlist(args))
        except Exception as error:
            raise PatchAEError(
                f"bad argument ({str(error).splitlines()[0]}); see python -m {module} --help"
            ) from None
        results = run(OmegaConf.to_object(cfg))
    except PatchAEError as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
    print(format_results(results))
    if cfg.get("output"):  # configs without the key write their own files
        Path(cfg.output).write_text(json.dumps(results, indent=2))
    return results
