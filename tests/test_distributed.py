"""Data-parallel certified training: 2 gloo processes under torchrun match 1 process with the
same global batch."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from pyibp import distributed

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + [str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def test_two_gloo_processes_match_one_process(tmp_path):
    one = _run([sys.executable, WORKER], tmp_path / "one.json")
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port()), WORKER], tmp_path / "two.json")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["steps"] == two["steps"] == 16
    for a, b in zip(one["history"], two["history"]):
        assert a["examples"] == b["examples"] == 400
        for key in ("loss", "error", "verified_error"):
            assert b[key] == pytest.approx(a[key], abs=2e-3), key
    assert two["param_norm"] == pytest.approx(one["param_norm"], rel=1e-4)
    assert one["history"][-1]["loss"] < one["history"][0]["loss"]  # it trained


def test_sharded_loader_gives_each_rank_its_slice_of_the_same_global_batches():
    data = torch.utils.data.TensorDataset(torch.arange(103)[:, None].float(), torch.arange(103))
    slices = []
    for rank in range(3):
        ctx = distributed.DistContext(rank=rank, world_size=3)
        loader = distributed.ShardedLoader(data, 10, ctx=ctx, seed=5)
        loader.set_epoch(2)
        slices.append([y for _, y in loader])
    assert len(slices[0]) == 11
    single = distributed.ShardedLoader(data, 10, ctx=distributed.DistContext(), seed=5)
    single.set_epoch(2)
    for step, (_, y) in enumerate(single):
        merged = torch.cat([slices[r][step] for r in range(3)])
        assert sorted(merged.tolist()) == sorted(y.tolist())


def test_sharded_loader_takes_the_epoch_seed_and_matches_pyibp_data_loader():
    from pyibp.data import loader
    data = torch.utils.data.TensorDataset(torch.rand(103, 2), torch.arange(103))
    sharded = distributed.ShardedLoader(data, 10, ctx=distributed.DistContext())
    sharded.set_epoch(4, seed=1234)
    reference = list(loader(data, 10, shuffle=True, seed=1234))
    assert len(list(sharded)) == len(reference) == 11
    for (x, y), (x_ref, y_ref) in zip(sharded, reference):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    sharded.set_epoch(4)                                   # default: seed + epoch, as before
    assert [y.tolist() for _, y in sharded] == [y.tolist() for _, y in loader(data, 10, shuffle=True, seed=4)]


def test_sharded_loader_refuses_a_last_batch_without_an_example_for_every_rank():
    data = torch.utils.data.TensorDataset(torch.arange(101)[:, None].float(), torch.arange(101))
    with pytest.raises(ValueError, match="last global batch holds 1 examples.*3 processes"):
        distributed.ShardedLoader(data, 10, ctx=distributed.DistContext(rank=0, world_size=3))
    distributed.ShardedLoader(data, 10, ctx=distributed.DistContext(rank=0, world_size=1))   # one process: fine


def test_autocast_forward_runs_the_model_in_bf16_and_the_bounds_in_float32():
    import pyibp
    from pyibp.models import tutorial_cnn
    torch.manual_seed(0)
    model = tutorial_cnn().eval()
    amp_model = distributed.AutocastForward(model, "cpu")
    inner = []
    model[0].register_forward_hook(lambda module, args, out: inner.append(out.dtype))
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    logits = amp_model(x)
    assert inner == [torch.bfloat16] and logits.dtype == torch.float32
    assert distributed.unwrap(amp_model) is model
    margins = pyibp.margin_bounds(amp_model, x, y, 0.01)
    assert margins.dtype == torch.float32 and torch.equal(margins, pyibp.margin_bounds(model, x, y, 0.01))
