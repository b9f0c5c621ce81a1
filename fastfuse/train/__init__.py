"""Training, evaluation and the demo for the fusion models of `fastfuse.models`.

    fastfuse train MODEL [--data PATH] --out DIR      (fastfuse.train.trainer)
    fastfuse eval --checkpoint FILE [--data PATH]      (fastfuse.train.evaluate)
    fastfuse demo                                       (fastfuse.train.demo)

Data and the observation model: fastfuse.train.data. Imported lazily by the CLI, so `import
fastfuse` never pays for it.
"""
from fastfuse.train.data import Degradation, PatchDataset, Scene, StepBatchSampler, load_scenes, split_scenes
from fastfuse.train.trainer import TrainConfig, TrainResult, train

__all__ = ["Degradation", "PatchDataset", "Scene", "StepBatchSampler", "load_scenes", "split_scenes",
           "TrainConfig", "TrainResult", "train"]
