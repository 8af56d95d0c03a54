"""The same training loop under torch.distributed: shards, gradient equivalence, torchrun runs."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data.distributed import DistributedSampler

import data_loader as dl
import feature_store
import training
from checkpoint import build_model, load_model_from_checkpoint
from conftest import ROOT

TINY = {"channels": 16, "kernel_size": 3, "n_layers": 1, "n_heads": 2, "n_features": 15, "causal": False}


def test_two_shards_cover_every_window_and_overlap_only_in_padding(small_data_dir):
    store = feature_store.build_feature_store(small_data_dir, causal=False, cache_dir=None)
    data = training.prepare(store, store.subjects)
    dataset = training.WindowDataset(data, store.subjects, seq_len=25, stride=7, seed=0)
    shards = []
    for rank in (0, 1):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=5)
        sampler.set_epoch(3)
        shards.append(list(sampler))
    assert len(shards[0]) == len(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(range(len(dataset)))
    overlap = len(shards[0]) + len(shards[1]) - len(dataset)
    assert overlap == len(dataset) % 2  # only the sample padded to even the shards
    assert len(set(shards[0]) & set(shards[1])) == overlap


def _global_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 25, 15, generator=g)
    y = torch.randint(0, 4, (8, 25), generator=g)
    y[1, :5] = -1
    y[6, :] = 3  # a REM-heavy window makes the two ranks' weight sums differ
    return x, y


def _step(rank, world_size, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = build_model("hybrid", TINY)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    cfg = training.TrainConfig(rem_noise=0.0, dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # linear in the gradient, unlike Adam near 0
    x, y = _global_batch()
    half = len(x) // world_size
    weight = torch.tensor([2.0, 0.5, 1.5, 3.0])
    model.eval()  # no dropout, so the step is deterministic
    training.train_step(ddp, optimizer, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half],
                        weight, cfg, training.Dist(rank, world_size, rank))
    if rank == 0:
        torch.save(model.state_dict(), out_file)
    dist.destroy_process_group()


def test_one_ddp_step_equals_one_single_process_step(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_step, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = build_model("hybrid", TINY)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # linear in the gradient, unlike Adam near 0
    x, y = _global_batch()
    model.eval()
    training.train_step(model, optimizer, x, y, torch.tensor([2.0, 0.5, 1.5, 3.0]),
                        training.TrainConfig(rem_noise=0.0, dropout=0.0), training.Dist())
    ddp_state = torch.load(out, weights_only=True)
    assert not torch.allclose(initial["head.3.weight"], model.state_dict()["head.3.weight"])  # the step moved
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-5, atol=1e-6)  # stated tolerance


def test_torchrun_two_processes_write_one_checkpoint_that_inference_loads(small_data_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train_hybrid.py", "--data-dir", str(small_data_dir), "--out-dir", str(out), "--epochs", "2",
           "--stride", "25", "--device", "cpu"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pth") == ["last.pth", "model.pth"]
    assert result.stdout.count("best epoch") == 1  # only rank 0 reports
    assert "x2" in result.stdout
    _, _, ckpt = load_model_from_checkpoint(out / "model.pth", expected_arch="hybrid")
    log_lines = (out / "train_log.csv").read_text().splitlines()
    assert len(log_lines) == 3  # header + 2 epochs, written once
    infer = subprocess.run([sys.executable, "inference_hybrid.py", "--checkpoint", str(out / "model.pth"),
                            "--data-dir", str(small_data_dir), "--plots-dir", ""],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert infer.returncode == 0, infer.stderr[-2000:]
    assert "kappa" in infer.stdout


def test_batch_scoring_with_two_workers_writes_the_same_csv(small_data_dir, tmp_path):
    one, two = tmp_path / "k1.csv", tmp_path / "k2.csv"
    checkpoint = ROOT / "checkpoints" / "hybrid_offline" / "model.pth"
    for path, workers in ((one, "1"), (two, "2")):
        result = subprocess.run([sys.executable, "inference_hybrid.py", "--checkpoint", str(checkpoint),
                                 "--data-dir", str(small_data_dir), "--predictions-out", str(path),
                                 "--plots-dir", "", "--workers", workers],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    assert one.read_bytes() == two.read_bytes()
    assert len(one.read_text().splitlines()) == 1 + sum(len(n) for n in dl.load_nights(small_data_dir, cache_dir=None))
