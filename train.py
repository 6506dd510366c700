"""Train a Patch AE, build its memory bank, test it: `python train.py category=screw loss.alpha=0.5`."""

import hydra
from omegaconf import DictConfig

from patchae.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
