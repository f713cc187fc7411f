"""What a task holding GPUs sees of them: their device files in its sandbox, and their indices.

The agent hands each GPU task whole devices by index (admission.py). In the sandbox the task
gets the device files of those GPUs and the driver's shared ones (bound over bwrap's minimal
/dev), and ``CUDA_VISIBLE_DEVICES`` names them, so CUDA numbers them from 0 as usual. A task
that holds no GPU sees none: no device file, whatever the node has.
"""

from __future__ import annotations

import os

# The NVIDIA driver's shared device files: control, unified memory, modesetting.
_SHARED = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")


def gpu_environment(devices: tuple[int, ...]) -> dict[str, str]:
    """The variables that tell CUDA (and the task) which GPUs are its own."""
    if not devices:
        return {}
    named = ",".join(str(i) for i in devices)
    return {"CUDA_VISIBLE_DEVICES": named, "NVIDIA_VISIBLE_DEVICES": named, "MESH_GPUS": named}


def gpu_device_files(devices: tuple[int, ...]) -> tuple[str, ...]:
    """The device files a task holding ``devices`` needs, those that exist on this host."""
    if not devices:
        return ()
    wanted = [f"/dev/nvidia{i}" for i in devices] + list(_SHARED)
    return tuple(path for path in wanted if os.path.exists(path))
