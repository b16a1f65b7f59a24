"""The process the fault-injection test kills: one training run, optionally set to kill itself
with SIGKILL at a chosen point inside its first checkpoint write."""

import os
import signal

PHASES = ("model-written", "state-written", "torn-state", "before-fsync", "before-rename",
          "after-rename")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(phase: str) -> None:
    """Patch the checkpoint writer so this process dies at ``phase`` of its first save."""
    import altpo.train.checkpoint as ck

    real_model, real_save, real_tree, real_rename, real_fsync = (
        ck._save_model_folder, ck.save_file, ck.fsync_tree, ck.os.rename, ck.fsync_path)

    def model_folder(folder, model, tokenizer):
        real_model(folder, model, tokenizer)
        if phase == "model-written":
            _die()

    def save_file(tensors, path, *a, **k):
        real_save(tensors, path, *a, **k)
        if phase == "state-written":
            _die()
        if phase == "torn-state":  # the kill came while the file was half written
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            _die()

    def fsync_tree(folder):
        if phase == "before-fsync":
            _die()
        real_tree(folder)

    def rename(src, dst):
        if phase == "before-rename" and ".tmp-step" in str(src):
            _die()
        real_rename(src, dst)

    def fsync_path(path):
        real_fsync(path)
        if phase == "after-rename" and str(path).endswith("checkpoints"):
            _die()

    ck._save_model_folder, ck.save_file, ck.fsync_tree, ck.fsync_path = (
        model_folder, save_file, fsync_tree, fsync_path)
    ck.os = type("os_with_rename", (), {"__getattr__": lambda self, n: getattr(os, n),
                                        "rename": staticmethod(rename)})()


def run(settings: dict, phase: str | None = None) -> None:
    import torch

    from altpo.train import train
    from altpo.train.config import TrainConfig

    torch.set_num_threads(1)
    if phase:
        _arm(phase)
    train(TrainConfig(**settings))
