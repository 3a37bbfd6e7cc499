"""What the resume tests share: a training run cut right after it wrote its first checkpoint, as a killed run is."""
from __future__ import annotations

import pytest

import maskprune.train as trainer


class Stop(Exception):
    """Raised by a patched checkpoint writer: the run dies right there."""


def train_until_first_checkpoint(cfg, out, monkeypatch) -> None:
    """Runs `cfg` into `out` and stops it (Stop) right after its first last.pt is written (after epoch 1)."""
    real_save = trainer.save_atomic

    def stop_after_first_last_pt(obj, path):
        real_save(obj, path)
        if path.name == "last.pt":
            raise Stop

    monkeypatch.setattr(trainer, "save_atomic", stop_after_first_last_pt)
    with pytest.raises(Stop):
        trainer.train(cfg, out, quiet=True)
    monkeypatch.setattr(trainer, "save_atomic", real_save)
