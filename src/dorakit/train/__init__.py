"""Fine-tuning with DoRA: ``dorakit.train.run(TrainConfig(...))`` is what ``dorakit train`` calls."""

from .loop import TrainingError, run
from .options import TrainConfig

__all__ = ["TrainConfig", "TrainingError", "run"]
