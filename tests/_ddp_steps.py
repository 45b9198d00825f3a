"""Train a tiny model with `vaelens.train.fit` and save the weights after every optimizer step.

Run by tests/test_dist.py::test_ddp_gradients_are_synchronized, both under torchrun (2 ranks) and as a
plain process: `python tests/_ddp_steps.py OUT_DIR`. Each rank writes OUT_DIR/rank<r>.pt, a list of
flattened weight vectors, one per step.

The reparameterization noise is switched off here (Normal.rsample returns the mean): every rank draws
its own noise, seeded by its rank, so no choice of batches would let two ranks and one process draw
the same noise for the same rows. Without noise the step is a deterministic function of the batch,
and gradient synchronization is then the only thing that can make the runs agree.
"""

import os
import sys

import numpy as np
import torch
from torch.distributions import Normal
from torch.optim.optimizer import register_optimizer_step_post_hook

from vaelens import data, train
from vaelens.config import DataConfig, ModelConfig, RunConfig, TrainConfig

N_ROWS, STEPS = 64, 4


def main(out):
    Normal.rsample = lambda self, sample_shape=torch.Size(): self.loc.expand(
        torch.Size(sample_shape) + self.loc.shape).clone()
    torch.set_num_threads(1)
    # batch = every row, so each epoch is one step over the same global batch whatever the shuffle;
    # under 2 ranks each rank's half (rows r, r+2, ...) is a local batch of N_ROWS // 2
    cfg = RunConfig(data=DataConfig(val_fraction=0.0), model=ModelConfig(latent_dim=3, hidden=(32,)),
                    train=TrainConfig(epochs=STEPS, batch_size=N_ROWS, lr=3e-3, seed=5, device="cpu"))
    cfg, X, _ = train.prepare(cfg, data.load_digits().subset(np.arange(N_ROWS)))
    seen = []

    def after_step(opt, args, kwargs):
        seen.append(torch.cat([p.detach().flatten() for g in opt.param_groups for p in g["params"]]).clone())

    h = register_optimizer_step_post_hook(after_step)
    try:
        train.fit(cfg, X, None, progress=False)
    finally:
        h.remove()
    torch.save(seen, os.path.join(out, f"rank{os.environ.get('RANK', '0')}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
