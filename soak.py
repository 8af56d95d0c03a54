"""Soak run: many simulated wearers stream whole nights in accelerated time; throughput and memory.

    python soak.py [--wearers 1000] [--hours 8] [--max-seconds 300] [--path pool|batch]
                   [--checkpoint checkpoints/hybrid_causal/model.pth] [--threads 1]

Each wearer sends heart rate about every 5 s and a 15 s activity count (a cheap numpy generator:
a per-wearer resting level, a ~90 min cycle, noise, movement bursts, 0.2% NaN readings, one in
five wearers takes the watch off for up to 45 min). Simulated time runs as fast as the machine
allows: every 30 s of it, each wearer's readings are pushed and one batched model call stages
every epoch that closed; the pool's revised stages are collected as they come, as a consumer would.

--path pool   realtime.StagerPool: the full stream rules per wearer (timestamps, late and
              duplicate readings, gaps), one model call per simulated epoch for all wearers.
--path batch  stager_batch.StagerBatch: wearers in lockstep, state in numpy arrays; readings are
              assigned to the epoch by the caller (no timestamp rules).

Prints one JSON object: wearer-epochs staged per second, the time ingesting readings (push/aggregate) and in
the model, and the process RSS (VmRSS from /proc/self/status) at the end of every simulated hour;
memory is called flat when the last hour's RSS is within 5% of the 2nd hour's (the 1st with
--hours 2 or less). --max-seconds bounds the run: it stops after the simulated epoch that crosses
it and reports how far it got. Without a checkpoint, an untrained causal hybrid of the shipped
size (train_hybrid.CAUSAL_MODEL) stands in: the same compute, meaningless stages. Not run in CI.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data_loader as dl
import features
import realtime
import stager_batch
from memory_check import progress

EPOCH_S = dl.EPOCH_S
PROGRESS_EVERY_S = 10.0  # a progress line at least this often, and at every simulated hour
HR_PER_EPOCH = 6        # one heart-rate reading every ~5 s
COUNTS_PER_EPOCH = 2    # one 15 s activity count
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "hybrid_causal" / "model.pth"


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def load_model(checkpoint: str | None):
    """(model, scaler, checkpoint dict, description): the given or default checkpoint, else an untrained stand-in."""
    from checkpoint import build_model, load_model_from_checkpoint, make_checkpoint
    path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    if path.is_file():
        model, scaler, ckpt = load_model_from_checkpoint(path)
        return model, scaler, ckpt, str(path)
    if checkpoint:
        raise SystemExit(f"error: checkpoint {checkpoint} not found")
    from train_hybrid import CAUSAL_MODEL, CAUSAL_TRAIN
    from training import script_config
    torch.manual_seed(0)
    names = CAUSAL_TRAIN.features
    config = script_config(CAUSAL_MODEL)
    model = build_model("hybrid", {**config, "n_features": len(names), "causal": True}).eval()
    scaler = dl.FeatureScaler(np.zeros(len(names), np.float32), np.ones(len(names), np.float32))
    ckpt = make_checkpoint(model, "hybrid", features=list(names), seq_len=CAUSAL_TRAIN.seq_len,
                           target_pos=CAUSAL_TRAIN.target_pos, scaler=scaler)
    return model, scaler, ckpt, f"untrained causal hybrid {config} (no {path})"


class Wearers:
    """Synthetic heart rate and activity counts for n wearers, one 30 s epoch at a time."""

    def __init__(self, n: int, n_epochs: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.n = n
        self.rest_bpm = self.rng.uniform(52, 72, n)
        self.phase = self.rng.uniform(0, 2 * math.pi, n)
        self.restless = self.rng.uniform(0.02, 0.15, n)
        off = self.rng.random(n) < 0.2  # one in five takes the watch off once, for up to 45 min
        self.off_start = np.where(off, self.rng.integers(0, max(n_epochs, 1), n), -1)
        self.off_end = self.off_start + self.rng.integers(1, 91, n)

    def epoch(self, k: int):
        """(on (n,) bool, hr_t (n, 6), hr (n, 6), count_t (2,), counts (n, 2)) of epoch k."""
        rng, n = self.rng, self.n
        t0 = k * EPOCH_S
        on = ~((self.off_start >= 0) & (k >= self.off_start) & (k < self.off_end))
        hr_t = t0 + 5.0 * np.arange(HR_PER_EPOCH) + rng.uniform(0, 1, (n, HR_PER_EPOCH))
        cycle = np.sin(2 * math.pi * hr_t / 5400.0 + self.phase[:, None])
        hr = self.rest_bpm[:, None] + 6.0 * cycle + rng.normal(0, 2.0, (n, HR_PER_EPOCH))
        hr[rng.random((n, HR_PER_EPOCH)) < 0.002] = np.nan
        moving = rng.random((n, COUNTS_PER_EPOCH)) < self.restless[:, None]
        counts = np.where(moving, rng.exponential(60.0, (n, COUNTS_PER_EPOCH)), 0.0)
        count_t = t0 + 15.0 * np.arange(COUNTS_PER_EPOCH)
        return on, hr_t, hr, count_t, counts


def soak(args) -> dict:
    torch.set_num_threads(args.threads)
    model, scaler, ckpt, described = load_model(args.checkpoint)
    n_epochs = int(round(args.hours * 3600 / EPOCH_S))
    progress(f"soak: {args.wearers} wearers, {args.hours:g} simulated h ({n_epochs} epochs), path {args.path}, "
             f"at most {args.max_seconds:g} s; model {described}")
    wearers = Wearers(args.wearers, n_epochs, args.seed)
    if args.path == "pool":
        pool = realtime.StagerPool(model, scaler, ckpt, batch_size=args.batch_size, start_s=0.0)
    else:
        batch = stager_batch.StagerBatch(model, scaler, ckpt, n_wearers=args.wearers, start_s=0.0)
        hr_owner = np.repeat(np.arange(args.wearers), HR_PER_EPOCH)
        count_owner = np.repeat(np.arange(args.wearers), COUNTS_PER_EPOCH)
    rss = {0: round(rss_mib(), 1)}  # simulated hour -> MiB
    staged, revised, nan_pushed, push_s, model_s = 0, 0, 0, 0.0, 0.0
    t_start = time.perf_counter()
    last_line = t_start
    done = 0
    for k in range(n_epochs):
        on, hr_t, hr, count_t, counts = wearers.epoch(k)
        t0 = time.perf_counter()
        if args.path == "pool":
            nan_pushed += int(np.isnan(hr[on]).sum())
            for w in np.flatnonzero(on):
                pool.push(int(w), "heart_rate", hr_t[w], hr[w])
                pool.push(int(w), "counts", count_t, counts[w])
            t1 = time.perf_counter()
            staged += sum(len(v) for v in pool.predict().values())
            revised += sum(len(v) for v in pool.take_revised().values())  # as a consumer collects them
        else:
            hr_on, count_on = np.repeat(on, HR_PER_EPOCH), np.repeat(on, COUNTS_PER_EPOCH)
            aggregates = batch.aggregate(hr_owner[hr_on], hr.ravel()[hr_on], count_owner[count_on],
                                         counts.ravel()[count_on])
            t1 = time.perf_counter()
            _, stages, _ = batch.step(**aggregates)
            staged += len(stages)
        t2 = time.perf_counter()
        push_s += t1 - t0
        model_s += t2 - t1
        done = k + 1
        hour_done = done % (3600 // EPOCH_S) == 0
        if hour_done:
            rss[done * EPOCH_S // 3600] = round(rss_mib(), 1)
        now = time.perf_counter()
        if hour_done or now - last_line >= PROGRESS_EVERY_S:
            progress(f"soak: epoch {done}/{n_epochs} ({done * EPOCH_S / 3600:.2f} simulated h), "
                     f"{staged / (now - t_start):.0f} wearer-epochs/s, RSS {rss_mib():.0f} MiB")
            last_line = now
        if now - t_start > args.max_seconds:
            progress(f"soak: stopping after {now - t_start:.0f} s (--max-seconds {args.max_seconds:g})")
            break
    if args.path == "pool":  # the end of the night: the last open epoch of every wearer closes
        t0 = time.perf_counter()
        pool.flush(done * EPOCH_S)
        t1 = time.perf_counter()
        staged += sum(len(v) for v in pool.predict().values())
        revised += sum(len(v) for v in pool.take_revised().values())
        push_s += t1 - t0
        model_s += time.perf_counter() - t1
    elapsed = time.perf_counter() - t_start
    result = {
        "path": args.path, "wearers": args.wearers, "hours": args.hours, "max_seconds": args.max_seconds,
        "model": described, "torch_threads": torch.get_num_threads(),
        "simulated_epochs": done, "simulated_hours": round(done * EPOCH_S / 3600, 2),
        "stopped_early": done < n_epochs,
        "wearer_epochs_staged": staged, "seconds": round(elapsed, 1),
        "wearer_epochs_per_second": round(staged / elapsed, 1) if elapsed > 0 else None,
        "ingest_seconds": round(push_s, 1), "model_seconds": round(model_s, 1),
        "rss_mib_by_simulated_hour": rss,
    }
    if args.path == "pool":
        totals = {key: sum(s.stats[key] for s in pool.stagers.values()) for key in realtime.new_stats()}
        result["stream_stats"] = {key: value for key, value in totals.items() if value}
        result["wearer_epochs_revised"] = revised
        result["nan_readings_pushed"] = nan_pushed
        result["buffered_readings_at_end"] = sum(sum(s.buffered_samples().values()) for s in pool.stagers.values())
    hourly = [rss[h] for h in sorted(rss) if h > 0]
    if len(hourly) >= 2:
        reference = hourly[1] if len(hourly) >= 3 else hourly[0]
        result["memory_flat"] = bool(abs(hourly[-1] - reference) <= 0.05 * reference)
        result["memory_flat_rule"] = (f"last hour {hourly[-1]} MiB within 5% of hour "
                                      f"{2 if len(hourly) >= 3 else 1} ({reference} MiB)")
    else:
        result["memory_flat"] = None
        result["memory_flat_rule"] = "fewer than 2 simulated hours completed"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wearers", type=int, default=1000)
    parser.add_argument("--hours", type=float, default=8.0, help="simulated hours per wearer")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop after this much wall time")
    parser.add_argument("--path", choices=("pool", "batch"), default="pool")
    parser.add_argument("--checkpoint", default=None, help=f"causal checkpoint (default {DEFAULT_CHECKPOINT} "
                        "if present, else an untrained stand-in of the same size)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: leave cores to others)")
    parser.add_argument("--batch-size", type=int, default=1024, help="windows per model call (pool)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.wearers < 1 or args.hours <= 0 or args.max_seconds <= 0 or args.threads < 1:
        parser.error("--wearers, --hours, --max-seconds and --threads must be positive")
    print(json.dumps(soak(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
