"""The model a run trains (train/model.py): a run is a function of its options, the new head included."""

from __future__ import annotations

import pytest
import torch

from dorakit.train.model import load_for_training
from dorakit.train.options import TrainConfig

from .train_assets import make_model_dir

pytest.importorskip("transformers")


def test_a_new_classification_head_is_drawn_from_the_seed(tmp_path):
    # The checkpoint's head has 2 outputs, the data 3 labels: transformers draws a new head while loading.
    path = make_model_dir(tmp_path / "clf", kind="classifier")
    cfg = TrainConfig(model=str(path), data="x", seed=7)
    heads = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # whatever the process did before
        model = load_for_training(cfg, path, ["cold", "plain", "warm"]).model
        heads.append(model.score.modules_to_save.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
