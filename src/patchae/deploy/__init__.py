"""Deployment: loading trained models, screening images (predict), export to TorchScript / ONNX, runtimes."""
