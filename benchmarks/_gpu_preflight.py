"""Preflight of the GPU check scripts: print torch and the GPU, fail in one line when the requested
CUDA device is not there (``python benchmarks/_gpu_preflight.py cuda``)."""

import sys

import torch

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit(f"error: GPU_DEVICE={device} but torch.cuda.is_available() is False; run this on a GPU machine")
    print(f"GPU: {torch.cuda.get_device_name(torch.device(device))}")
