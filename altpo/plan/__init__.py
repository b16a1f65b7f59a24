"""The memory planner: every byte of a run (weights, gradients, optimizer states, master weights,
activations, loss workspace, CUDA context) before it starts, and the settings that fit a device.
Used by ``altpo-fast plan`` and by the trainer's ``auto`` settings."""
