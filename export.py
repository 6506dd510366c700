"""Export a trained model to TorchScript and ONNX: `python export.py ckpt=<model.ckpt> [format=both] [output=<dir>]`."""

from patchae.deploy.export import main

if __name__ == "__main__":
    main()
