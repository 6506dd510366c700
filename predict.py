"""Screen images with a trained model: `python predict.py ckpt=<model.ckpt> input=<image|folder|glob|-> [output=<dir>]`."""

import hydra
from omegaconf import DictConfig

from patchae.deploy.predict import run


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
