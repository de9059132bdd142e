"""Run by tests/test_distributed.py, as one plain process or as N processes under torchrun:
a short certified training on the embedded MNIST digits, written to the JSON file argv[1]."""
import json
import sys

import torch

from pyibp import distributed
from pyibp.data import mnist5k
from pyibp.models import tutorial_cnn
from pyibp.training import IBP, LinearRamp, train_epoch


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    ctx = distributed.init_distributed("cpu")
    train, _ = mnist5k()
    subset = torch.utils.data.TensorDataset(*(t[:400] for t in train.tensors))
    torch.manual_seed(0)
    model = distributed.wrap_model(tutorial_cnn(), ctx)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = distributed.ShardedLoader(subset, global_batch_size=50, ctx=ctx, seed=0)
    step, history = 0, []
    for epoch in range(2):
        loader.set_epoch(epoch)
        method = IBP(LinearRamp(0.0, 0.1, 0, 16), LinearRamp(1.0, 0.5, 0, 16))
        metrics, step = train_epoch(model, method, loader, opt, step=step, quiet=True)
        history.append(distributed.reduce_metrics(metrics, ctx))
    if ctx.is_main:
        params = torch.cat([p.detach().flatten() for p in distributed.unwrap(model).parameters()])
        with open(out_path, "w") as f:
            json.dump({"world_size": ctx.world_size, "history": history, "param_sum": float(params.sum()),
                       "param_norm": float(params.norm()), "steps": step}, f)
    distributed.shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1])
