"""DistributedDataParallel over a fused LSTM: two gloo processes (file-store rendezvous), each training on
its half of the batch, end with identical replicas equal to one process trained on the whole
batch (mean-reduced losses, so DDP's gradient averaging reproduces the full-batch gradient)."""
import datetime
import gc
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_rnn

WORLD_SIZE = 2
STEPS = 3
LEARNING_RATE = 0.5
BATCH, SEQUENCE, FEATURES = 6, 5, 3  # BATCH splits evenly over WORLD_SIZE ranks
DEADLINE_SECONDS = 120


class SequenceRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fused_rnn.LSTM(FEATURES, 4, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y.mean(dim=1))


def make_model():
    torch.manual_seed(0)
    return SequenceRegressor().double()


def make_data():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(BATCH, SEQUENCE, FEATURES, generator=generator, dtype=torch.float64)
    targets = torch.randn(BATCH, 1, generator=generator, dtype=torch.float64)
    return inputs, targets


def train(model, inputs, targets):
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def train_one_replica(rank, result_dir):
    """Process body: joins the group, trains a DDP replica on this rank's half of the batch and
    saves its parameters to result_dir/rank{rank}.pt."""
    # A file store, not a TCP port: no race for a free port with other processes on the machine.
    dist.init_process_group("gloo", init_method=f"file://{result_dir}/store", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        train_and_save_replica(rank, result_dir)
    finally:
        dist.destroy_process_group()
        # DDP's reference cycles keep the process group alive past destroy_process_group. Freed by
        # the interpreter's final collection instead, its gloo threads would still be releasing
        # work objects while Python shuts down, and abort the process (pytorch/pytorch#190489; it
        # happens with torch.nn.LSTM too). Collect while Python is fully alive.
        gc.collect()


def train_and_save_replica(rank, result_dir):
    replica = nn.parallel.DistributedDataParallel(make_model())
    inputs, targets = make_data()
    shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    train(replica, inputs[shard], targets[shard])
    torch.save(replica.module.state_dict(), f"{result_dir}/rank{rank}.pt")


def run_replicas(result_dir):
    """Spawns the WORLD_SIZE processes and waits for them, killing them past the deadline."""
    processes = mp.spawn(train_one_replica, args=(str(result_dir),), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not processes.join(timeout=1):  # raises if a process failed, with its traceback
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail(f"DDP processes did not finish within {DEADLINE_SECONDS} s")


def test_ddp_replicas_match_each_other_and_full_batch_training(tmp_path):
    run_replicas(tmp_path)
    replicas = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    single = make_model()
    initial = {name: value.clone() for name, value in single.state_dict().items()}
    train(single, *make_data())

    assert list(replicas[0]) == list(single.state_dict())
    for name, expected in single.state_dict().items():
        assert not torch.equal(expected, initial[name]), f"{name} did not train"
        for rank, replica in enumerate(replicas[1:], start=1):
            assert torch.equal(replica[name], replicas[0][name]), f"{name}: rank {rank} differs from rank 0"
        torch.testing.assert_close(replicas[0][name], expected, atol=1e-12, rtol=1e-10, msg=name)
