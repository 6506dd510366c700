"""Serve a trained model to the line: `python serve.py ckpt=<model.ckpt> [port=8000] [runtime=onnx]` (docs/serving.md)."""

import hydra
from omegaconf import DictConfig

from patchae.deploy.serve.app import run


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
