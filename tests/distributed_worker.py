"""Run by tests/test_distributed.py under `mlx.launch`: a few data-parallel steps of `tiny`.

Each process takes its rank's rows of the same global batches; process 0 saves the weights.
"""

import sys

import mixtral_mlx  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np

from mixtral_mlx import Model, load_preset
from mixtral_mlx.checkpoint import to_hf_weights
from mixtral_mlx.model import init_weights
from mixtral_mlx.train import TrainConfig, Trainer


class GlobalBatches:
    def __init__(self, batch_size, seq_len=32):
        self.batch_size, self.seq_len, self.index = batch_size, seq_len, 0

    def __next__(self):
        rng = np.random.default_rng(self.index)
        self.index += 1
        seq = rng.integers(0, 512, size=(self.batch_size, self.seq_len + 1))
        return {"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
                "mask": np.ones((self.batch_size, self.seq_len), np.float32)}


def main(out: str, global_batch: int, steps: int) -> None:
    # The load-balancing loss is a product of per-shard means, so shards do not add up to the
    # whole batch exactly; it is switched off here (the z-loss is a plain mean and stays on).
    cfg = TrainConfig(iters=steps, warmup=1, lr=2e-3, batch_size=global_batch, aux_loss_coef=0.0)
    trainer = Trainer(init_weights(Model(load_preset("tiny")), seed=0), cfg)
    batches, per_rank = GlobalBatches(global_batch), global_batch // trainer.world
    for _ in range(steps):
        batch = next(batches)  # this process's rows of the global batch
        trainer.train_step([{k: v[trainer.rank * per_rank:(trainer.rank + 1) * per_rank] for k, v in batch.items()}])
    if trainer.rank == 0:
        mx.save_safetensors(out, to_hf_weights(trainer.model))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
