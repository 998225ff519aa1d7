"""Data-parallel meta-training over `paddle.distributed` (gloo on CPUs, NCCL on GPUs).

MAML parallelises over the tasks of a meta-batch: every rank draws the *same* meta-batch from the
same seeded task stream and keeps its own contiguous block of tasks, so the union over ranks is
exactly the single-process meta-batch. Each rank's mean meta-gradient is weighted by its share of the
tasks and the weighted gradients are summed with `all_reduce`; every rank then applies the identical
Adam update, so the weights stay equal without being broadcast. Rank 0 alone writes files.

    python -m paddle.distributed.launch --nproc_per_node 2 -m train --data ../shared/omniglot ...

Outside a launcher this is a world of one and every method is a no-op.
"""
from __future__ import annotations

import os

import numpy as np
import paddle

from .errors import ConfigError, MamlError


class RankLostError(MamlError):
    """A collective failed: another rank died or the connection between ranks broke."""


class Ranks:
    """This process's place in the run: `rank` of `world`."""

    def __init__(self):
        self.world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
        self.rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
        if self.world > 1:
            if not paddle.is_compiled_with_cuda():
                os.environ.setdefault("PADDLE_DISTRI_BACKEND", "gloo")  # CPUs: gloo (NCCL needs GPUs)
            paddle.distributed.init_parallel_env()

    @property
    def main(self) -> bool:
        """The rank that writes checkpoints, metrics and the progress bar."""
        return self.rank == 0

    def check_meta_batch(self, n: int) -> None:
        if n < self.world:
            raise ConfigError(f"--meta-batch {n} is smaller than the {self.world} ranks: each rank needs a task")

    def block(self, n: int) -> slice:
        """This rank's contiguous block of n tasks (blocks of all ranks partition range(n); may be empty)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def sum(self, tensor):
        """Sum of `tensor` over ranks (in place, and returned)."""
        if self.world > 1:
            try:
                paddle.distributed.all_reduce(tensor)
            except RuntimeError as e:  # gloo: "Connection reset by peer" when a rank dies
                reason = " ".join(str(e).split())[-160:]
                raise RankLostError(f"rank {self.rank} of {self.world} lost the other ranks in all_reduce "
                                    f"(did a rank die? see the launcher's log dir): {reason}") from None
        return tensor

    def mean_of_blocks(self, values: dict, n: int) -> dict:
        """Combine per-rank means over this rank's block into means over all n tasks."""
        if self.world == 1:
            return values
        share = (self.block(n).stop - self.block(n).start) / n
        return {k: self.sum(v * share) for k, v in values.items()}

    def gather(self, values: np.ndarray) -> np.ndarray:
        """Arrays whose entries each rank filled in its blocks (zeros elsewhere) -> the full array everywhere."""
        if self.world == 1:
            return values
        return self.sum(paddle.to_tensor(values.astype(np.float32))).numpy()
