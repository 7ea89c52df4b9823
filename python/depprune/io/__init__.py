"""io stage: checkpoints on disk planned, scored and pruned without loading the model.

A Hugging Face safetensors checkpoint is read through its headers
(:class:`Checkpoint`), its architecture is built on the meta device from
``config.json`` (:func:`load_skeleton`), scored from the files a tensor at
a time (:func:`plan_checkpoint`), and written pruned tensor by tensor
(:func:`apply_to_checkpoint`), so a checkpoint larger than memory is pruned
with about one tensor in memory.

>>> import depprune.io
>>> sorted(depprune.io.__all__)[:3]
['Checkpoint', 'CheckpointReport', 'IMPORTANCE_NAMES']
"""

from depprune.io.checkpoint import Checkpoint
from depprune.io.pipeline import IMPORTANCE_NAMES, plan_checkpoint, prune_checkpoint
from depprune.io.scoring import streamed
from depprune.io.skeleton import load_skeleton
from depprune.io.streaming import CheckpointReport, apply_to_checkpoint

__all__ = [
    "IMPORTANCE_NAMES",
    "Checkpoint",
    "CheckpointReport",
    "apply_to_checkpoint",
    "load_skeleton",
    "plan_checkpoint",
    "prune_checkpoint",
    "streamed",
]
