"""Speed on this machine, printed as JSON: streaming latency, batched throughput, offline scoring, loading.

    python benchmark.py                          # full run
    python benchmark.py --quick                  # smoke run: fewer epochs, rounds and repeats
    python benchmark.py --json-out out/benchmark.json

1. stream_update: one StreamingStager (torch on one thread, as realtime.py runs it) replays a
   real bundled night epoch by epoch; an update is the push_heart_rate / push_counts calls with
   one epoch's readings, the first of which closes the previous epoch (aggregates, feature row,
   window, one model call). p50/p99 over --stream-epochs epochs after a warm-up.
2. batched: --wearers wearers each close one epoch per round, one batched model call per round;
   wearer-epochs per second of the median of --rounds rounds (and over all rounds), for torch
   threads in --threads (the best is reported; with n threads the windows run as n parts side by
   side, one torch thread each: evaluation.in_parallel).
   The same for the compact real-time model (`batched_compact`: checkpoints/hybrid_causal_compact,
   the hybrid at 32 channels, trained with `train_hybrid.py --causal --model channels=32`).
   `vectorised` is stager_batch.StagerBatch (every wearer's state in numpy arrays; with the hybrid it
   keeps each wearer's conv outputs, so only the new epoch and the padded start of the window go
   through the convolutions), `pool` is realtime.StagerPool (one StreamingStager per wearer,
   readings pushed with timestamps, then a flush at the epoch's end); both give the same
   probabilities (checked on the last round). `model_only` is the model call alone on as many wearers
   (model_call): predict_windows on whole windows (no conv cache), or for a whole-night model one step
   of every wearer's night. The stream's `model_call_p50_ms` is the same call on one wearer (softmax
   and the copy to numpy included).
   Wall-clock figures decide the targets. The CPU-time figures (`cpu_*`: this thread's CPU time
   per update; `wearer_epochs_per_cpu_s`: per CPU-second of the process) leave out the time the
   process waited for a core, so on a machine busy with other work they estimate what an idle
   one gives (single-threaded figures; with 2 threads, CPU time includes the workers' waiting).
3. offline_scoring: evaluation.predict_nights (features + model) per night on the bundled test
   subjects, both models.
4. data_loading: data_loader.load_nights for the bundled subjects, without cache and from cache.
5. apple_health_parse: apple_health.read_export on a synthetic export.zip of --health-mb MB of XML
   (synthetic.write_health_export, its records repeated), in a fresh process: MB/s and peak RSS.

Checkpoints come from checkpoints/<arch>_<mode>/model.pth; where one is missing, a freshly
initialised model of the training script's config (train_hybrid.py / train.py MODEL, CAUSAL_MODEL for
the causal figures) stands in (same shapes, same cost, untrained) and the JSON says so.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import data_loader as dl
import features
import evaluation
import realtime
import stager_batch
import synthetic
from checkpoint import CheckpointError, build_model, load_model_from_checkpoint, make_checkpoint
from memory_check import progress

ROOT = Path(__file__).resolve().parent
TARGETS = {"stream_update_p99_ms": 5.0, "batched_wearer_epochs_per_s": 20_000.0}
# the compact real-time model for batched serving: train_hybrid.py --causal --model channels=32
COMPACT = ("hybrid_causal_compact", {"channels": 32})
PUSH = {"heart_rate": "push_heart_rate", "counts": "push_counts", "motion": "push_acceleration", "steps": "push_steps"}


# ----------------------------------------------------------------------------- models

def _fresh_model(arch: str, causal: bool, nights: list[dl.Night], train_ids: list[str], overrides: dict | None = None):
    """(model, scaler, checkpoint) of an untrained model of the training script's config for that
    mode (MODEL/TRAIN offline, CAUSAL_MODEL/CAUSAL_TRAIN causal), with overrides."""
    if arch == "hybrid":
        import train_hybrid as script
    else:
        import train as script
    model_config, train_config = (script.CAUSAL_MODEL, script.CAUSAL_TRAIN) if causal else (script.MODEL, script.TRAIN)
    config = {k: v for k, v in asdict(model_config).items() if k not in ("n_features", "causal", "dropout")}
    config.update(overrides or {})
    names = list(train_config.features)
    torch.manual_seed(0)
    model = build_model(arch, {**config, "n_features": len(names), "causal": causal}).eval()
    train = [n for n in nights if n.subject_id in set(train_ids)] or nights
    scaler = dl.FeatureScaler.fit([features.night_features(n, causal=causal, features=tuple(names)) for n in train])
    checkpoint = make_checkpoint(model, arch, features=names, seq_len=train_config.seq_len,
                                 target_pos=train_config.target_pos, scaler=scaler)
    return model, scaler, checkpoint


def get_model(arch: str, causal: bool, checkpoint_dir: Path, nights: list[dl.Night], train_ids: list[str],
              folder: str | None = None, overrides: dict | None = None):
    """(model, scaler, checkpoint, description): the shipped checkpoint (checkpoints/<arch>_<mode>/, or
    folder), or a fresh stand-in of the script's config with overrides."""
    path = checkpoint_dir / (folder or f"{arch}_{'causal' if causal else 'offline'}") / "model.pth"
    if path.is_file():
        try:
            model, scaler, checkpoint = load_model_from_checkpoint(path, expected_arch=arch)
            return model, scaler, checkpoint, {"checkpoint": str(path), "fresh": False}
        except CheckpointError as exc:
            reason = f"{path} cannot be used ({exc})"
    else:
        reason = f"{path} not found"
    script = "train_hybrid.py" if arch == "hybrid" else "train.py"
    model, scaler, checkpoint = _fresh_model(arch, causal, nights, train_ids, overrides)
    return model, scaler, checkpoint, {
        "checkpoint": None, "fresh": True,
        "note": f"{reason}: a freshly initialised {'causal' if causal else 'offline'} {arch} of {script}'s "
                f"{'CAUSAL_MODEL' if causal else 'MODEL'} config{f' with {overrides}' if overrides else ''} stands in "
                "(same shapes and cost, untrained)"}


def _percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# ----------------------------------------------------------------------------- 1. one streaming update

def bench_stream(model, scaler, checkpoint, readings: dict, n_epochs: int, warmup: int) -> dict:
    """Latency of the push calls that bring one epoch's readings (and close the previous epoch)."""
    total = warmup + n_epochs + 1
    groups = [list(realtime.time_ordered_runs(readings, 30.0 * k, 30.0 * (k + 1))) for k in range(total)]
    stager = realtime.StreamingStager(model, scaler, checkpoint, start_s=0.0)
    times, cpu_times, sizes = [], [], []
    with evaluation.single_thread():
        gc.collect()
        for k, runs in enumerate(groups):
            t0, c0 = time.perf_counter(), time.thread_time()
            closed = 0
            for kind, rows in runs:
                closed += len(getattr(stager, PUSH[kind])(rows[:, 0], *rows[:, 1:].T))
            elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
            if k > warmup and closed:
                times.append(elapsed * 1000.0)
                cpu_times.append(cpu * 1000.0)
                sizes.append(sum(len(rows) for _, rows in runs))
        call = model_call(model, checkpoint, scaler.transform(np.zeros((1, max(checkpoint["seq_len"], 1),
                                                                        len(checkpoint["features"])), np.float32)))
        model_ms = []
        with torch.inference_mode():
            for _ in range(min(len(times), 200)):
                t0 = time.perf_counter()
                call()
                model_ms.append((time.perf_counter() - t0) * 1000.0)
    return {"epochs_timed": len(times), "readings_per_update_mean": float(np.mean(sizes)) if sizes else 0.0,
            "p50_ms": _percentile(times, 50), "p90_ms": _percentile(times, 90), "p99_ms": _percentile(times, 99),
            "mean_ms": float(np.mean(times)), "max_ms": float(np.max(times)),
            "cpu_p50_ms": _percentile(cpu_times, 50), "cpu_p99_ms": _percentile(cpu_times, 99),
            "model_call_p50_ms": _percentile(model_ms, 50), "torch_threads": 1}


# ----------------------------------------------------------------------------- 2. many wearers batched

def _wearer_epochs(nights_readings: list[dict], n_wearers: int, n_rounds: int):
    """Per round, per wearer: (hr rows, counts rows) of one epoch, each wearer a real night from its own offset."""
    rounds = [[None] * n_wearers for _ in range(n_rounds)]
    for w in range(n_wearers):
        readings = nights_readings[w % len(nights_readings)]
        n_available = readings["n_epochs"]
        offset = (w * 37) % max(n_available - n_rounds, 1)
        for r in range(n_rounds):
            lo, hi = 30.0 * (offset + r), 30.0 * (offset + r + 1)
            shift = 30.0 * offset
            rounds[r][w] = tuple(
                np.column_stack([rows[:, 0] - shift, rows[:, 1:]]) if len(rows) else rows
                for rows in (readings[kind][(readings[kind][:, 0] >= lo) & (readings[kind][:, 0] < hi)]
                             for kind in ("heart_rate", "counts")))
    return rounds


def _flat(round_readings, kind_index: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [r[kind_index] for r in round_readings]
    wearer = np.concatenate([np.full(len(p), w, np.int64) for w, p in enumerate(parts)])
    return wearer, np.concatenate([p[:, 1] for p in parts if len(p)] or [np.zeros(0)])


def model_call(model: torch.nn.Module, checkpoint: dict, windows: np.ndarray, batch_size: int = 1024
               ) -> Callable[[], object]:
    """The plain model call on these scaled windows (n, seq_len, F), as a function of no arguments: the
    window models' predict_windows; for a whole-night model (seq_len 0) one step of n nights with
    windows[:, -1] as their feature rows (each call one epoch further into the nights)."""
    if checkpoint["seq_len"] == 0:
        steps = evaluation.NightSteps(model, None, len(windows))
        epoch = np.ones(len(windows), np.int64)  # not a night's first epoch: the states go on
        return lambda: steps.push(epoch, windows[:, -1])
    return lambda: evaluation.predict_windows(model, windows, checkpoint["target_pos"], batch_size)


def bench_batched(model, scaler, checkpoint, nights_readings: list[dict], n_wearers: int, n_rounds: int,
                  warmup_rounds: int, threads: list[int]) -> dict:
    rounds = _wearer_epochs(nights_readings, n_wearers, warmup_rounds + n_rounds)
    flat = [(_flat(r, 0), _flat(r, 1)) for r in rounds]  # the vectorised path takes flat arrays
    results: dict = {"vectorised": {}, "pool": {}, "model_only": {}}
    last_probs = {}
    saved_threads = torch.get_num_threads()
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            progress(f"  {n_wearers} wearers x {warmup_rounds + n_rounds} rounds, {n_threads} torch thread(s): "
                     "vectorised, pool, model call")
            # vectorised: StagerBatch
            batch = stager_batch.StagerBatch(model, scaler, checkpoint, n_wearers)
            elapsed, cpu = [], []
            for r, ((hr_w, hr_v), (c_w, c_v)) in enumerate(flat):
                gc.collect()
                t0, c0 = time.perf_counter(), time.process_time()
                _, _, probs = batch.step(**batch.aggregate(hr_w, hr_v, c_w, c_v))
                if r >= warmup_rounds:
                    elapsed.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
            last_probs["vectorised"] = probs
            results["vectorised"][str(n_threads)] = _rate(n_wearers, elapsed, cpu)
            # pool: one StreamingStager per wearer
            pool = realtime.StagerPool(model, scaler, checkpoint, start_s=0.0)
            elapsed, cpu = [], []
            for r, round_readings in enumerate(rounds):
                gc.collect()
                t0, c0 = time.perf_counter(), time.process_time()
                for w, (hr, counts) in enumerate(round_readings):
                    if len(hr):
                        pool.push(w, "heart_rate", hr[:, 0], hr[:, 1])
                    if len(counts):
                        pool.push(w, "counts", counts[:, 0], counts[:, 1])
                pool.flush(30.0 * (r + 1), range(n_wearers))
                out = pool.predict()
                if r >= warmup_rounds:
                    elapsed.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
            last_probs["pool"] = np.stack([out[w][-1].probabilities for w in range(n_wearers)])
            results["pool"][str(n_threads)] = _rate(n_wearers, elapsed, cpu)
            # the model call alone, on the same number of windows
            call = model_call(model, checkpoint, batch.rows.copy(), batch.batch_size)
            elapsed, cpu = [], []
            for r in range(warmup_rounds + n_rounds):
                t0, c0 = time.perf_counter(), time.process_time()
                call()
                if r >= warmup_rounds:
                    elapsed.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
            results["model_only"][str(n_threads)] = _rate(n_wearers, elapsed, cpu)
    finally:
        torch.set_num_threads(saved_threads)
    for name in ("vectorised", "pool", "model_only"):
        best = max(results[name], key=lambda t: results[name][t]["wearer_epochs_per_s"])
        results[name] = {"by_threads": results[name], "best_threads": int(best),
                         "wearer_epochs_per_s": results[name][best]["wearer_epochs_per_s"]}
    vectorised, pooled = last_probs["vectorised"], last_probs["pool"]
    same_mask = bool((np.isnan(vectorised) == np.isnan(pooled)).all())  # no-data epochs: NaN in both
    difference = float(np.nanmax(np.abs(vectorised - pooled))) if not np.isnan(vectorised).all() else 0.0
    difference = difference if same_mask else float("inf")
    ring = realtime.window_ring(model, scaler, checkpoint, 1)  # one wearer's model state: window or steps
    state_bytes = ring.rows.nbytes if hasattr(ring, "rows") else sum(t.numel() * t.element_size() for t in ring.state)
    return {"wearers": n_wearers, "rounds": n_rounds, "warmup_rounds": warmup_rounds, **results,
            "model_state_bytes_per_wearer": int(state_bytes),
            "wearer_epochs_per_s": results["vectorised"]["wearer_epochs_per_s"],
            "best_threads": results["vectorised"]["best_threads"],
            "vectorised_vs_pool_max_abs_difference": difference, "vectorised_equals_pool": difference < 1e-5}


def _rate(n_wearers: int, elapsed: list[float], cpu: list[float]) -> dict:
    """Wall-clock rate of the median round (what counts; robust to a round preempted by other work),
    the mean over all rounds, and per CPU-second of this process (all its threads; median round)."""
    return {"wearer_epochs_per_s": n_wearers / statistics.median(elapsed),
            "wearer_epochs_per_s_all_rounds": n_wearers * len(elapsed) / sum(elapsed),
            "round_ms_median": statistics.median(elapsed) * 1000.0, "round_ms_min": min(elapsed) * 1000.0,
            "round_ms_max": max(elapsed) * 1000.0,
            "wearer_epochs_per_cpu_s": n_wearers / max(statistics.median(cpu), 1e-9)}


# ----------------------------------------------------------------------------- 3. offline scoring

def bench_offline(arch: str, checkpoint_dir: Path, nights: list[dl.Night], train_ids: list[str], test_ids: list[str],
                  repeats: int, max_epochs: int | None) -> dict:
    model, scaler, checkpoint, source = get_model(arch, False, checkpoint_dir, nights, train_ids)
    ids = checkpoint.get("test_subjects") or test_ids
    scored = [n for n in nights if n.subject_id in set(ids)]
    if max_epochs:
        scored = [_crop(n, max_epochs) for n in scored]
    evaluation.predict_nights(model, scaler, checkpoint, scored[:1])  # warm-up
    totals = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        evaluation.predict_nights(model, scaler, checkpoint, scored)
        totals.append(time.perf_counter() - t0)
    best = min(totals)
    return {**source, "nights": len(scored), "subjects": [n.subject_id for n in scored],
            "epochs_per_night_mean": float(np.mean([len(n) for n in scored])),
            "seconds_per_night": best / len(scored), "seconds_total_best": best, "repeats": repeats,
            "torch_threads": torch.get_num_threads(), **({"cropped_to_epochs": max_epochs} if max_epochs else {})}


def _crop(night: dl.Night, n: int) -> dl.Night:
    arrays = {name: getattr(night, name)[:n] for name in dl.Night.ARRAYS}
    return dl.Night(night.subject_id, **arrays, report=night.report)


# ----------------------------------------------------------------------------- 4. data loading

def bench_loading(data_dir: Path, repeats: int) -> dict:
    cold, cached = [], []
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache:
        n = len(dl.load_nights(data_dir, cache_dir=cache))  # fills the private cache
        for _ in range(repeats):
            t0 = time.perf_counter()
            dl.load_nights(data_dir, cache_dir=None)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dl.load_nights(data_dir, cache_dir=cache)
            cached.append(time.perf_counter() - t0)
    return {"subjects": n, "cold_s": statistics.median(cold), "cached_s": statistics.median(cached),
            "cold_s_min": min(cold), "cached_s_min": min(cached), "repeats": repeats}


# ----------------------------------------------------------------------------- main

def _machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads_default": torch.get_num_threads(), "load_average_1min_at_start": load}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer epochs, rounds and repeats")
    parser.add_argument("--json-out", default=None, help="also write the JSON here")
    parser.add_argument("--data-dir", default=str(dl.DEFAULT_DATA_DIR))
    parser.add_argument("--checkpoint-dir", default=str(ROOT / "checkpoints"))
    parser.add_argument("--subject", default="1066528", help="night replayed for the streaming latency")
    parser.add_argument("--stream-epochs", type=int, default=None, help="timed updates (default 500, quick 50)")
    parser.add_argument("--wearers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=None, help="timed batched rounds (default 10, quick 2)")
    parser.add_argument("--warmup-rounds", type=int, default=None, help="default 2, quick 1")
    parser.add_argument("--threads", default="2,1", help="torch thread counts tried for the batched figures")
    parser.add_argument("--repeats", type=int, default=None, help="offline scoring / loading repeats (default 3, quick 1)")
    parser.add_argument("--health-mb", type=float, default=None,
                        help="size of the synthetic Apple Health export parsed (default 256 MB, quick 2 MB; 0: skip)")
    parser.add_argument("--offline-epochs", type=int, default=None,
                        help="crop the scored nights to this many epochs (smoke tests only)")
    args = parser.parse_args(argv)
    stream_epochs = args.stream_epochs or (50 if args.quick else 500)
    rounds = args.rounds or (2 if args.quick else 10)
    warmup_rounds = args.warmup_rounds if args.warmup_rounds is not None else (1 if args.quick else 2)
    repeats = args.repeats or (1 if args.quick else 3)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    data_dir, checkpoint_dir = Path(args.data_dir), Path(args.checkpoint_dir)
    report: dict = {"machine": _machine(), "quick": args.quick}
    started = time.perf_counter()

    progress(f"benchmark: loading the nights in {data_dir}")
    nights = dl.load_nights(data_dir, cache_dir=None)
    ids = [n.subject_id for n in nights]
    train_ids, _, test_ids = dl.split_subjects(ids)

    # 1. one streaming update
    progress(f"benchmark: 1/5 streaming update latency, {stream_epochs} epochs of subject {args.subject}")
    model, scaler, checkpoint, source = get_model("hybrid", True, checkpoint_dir, nights, train_ids)
    readings_all = {n.subject_id: recorded_night(data_dir, n) for n in nights}
    if args.subject not in readings_all:
        parser.error(f"--subject {args.subject} is not in {data_dir}")
    stream = readings_all[args.subject]
    warmup = 20
    n_stream = min(stream_epochs, stream["n_epochs"] - warmup - 2)
    report["stream_update"] = {**source, "subject": args.subject,
                               **bench_stream(model, scaler, checkpoint, stream, n_stream, warmup)}

    # 2. many wearers, one model call per round
    progress("benchmark: 2/5 batched wearers, shipped real-time model")
    report["batched"] = {**source, **bench_batched(model, scaler, checkpoint, list(readings_all.values()), args.wearers,
                                                   rounds, warmup_rounds, threads)}
    progress("benchmark: 2/5 batched wearers, compact real-time model")
    model, scaler, checkpoint, source = get_model("hybrid", True, checkpoint_dir, nights, train_ids, *COMPACT)
    report["batched_compact"] = {**source, "channels": model.config.channels,
                                 **bench_batched(model, scaler, checkpoint, list(readings_all.values()), args.wearers,
                                                 rounds, warmup_rounds, threads)}

    # 3. whole nights offline, 4. loading
    report["offline_scoring"] = {}
    for arch in ("hybrid", "lstm"):
        progress(f"benchmark: 3/5 whole-night scoring, {arch}, {repeats} repeat(s)")
        report["offline_scoring"][arch] = bench_offline(arch, checkpoint_dir, nights, train_ids, test_ids, repeats,
                                                        args.offline_epochs)
    progress(f"benchmark: 4/5 loading the nights, without and with cache, {repeats} repeat(s)")
    report["data_loading"] = bench_loading(data_dir, repeats)
    health_mb = args.health_mb if args.health_mb is not None else (2.0 if args.quick else 256.0)
    if health_mb > 0:  # 5. an Apple Health export
        progress(f"benchmark: 5/5 writing and parsing a synthetic Apple Health export of {health_mb:g} MB")
        report["apple_health_parse"] = bench_health_export(health_mb)

    batched_target = TARGETS["batched_wearer_epochs_per_s"]
    report["targets"] = {"stream_update_p99_ms": f"< {TARGETS['stream_update_p99_ms']:g}",
                         "batched_wearer_epochs_per_s": f">= {batched_target:g}",
                         "batched_compact_wearer_epochs_per_s": f">= {batched_target:g}"}
    report["met"] = {
        "stream_update_p99_ms": report["stream_update"]["p99_ms"] < TARGETS["stream_update_p99_ms"],
        "batched_wearer_epochs_per_s": report["batched"]["wearer_epochs_per_s"] >= batched_target,
        "batched_compact_wearer_epochs_per_s": report["batched_compact"]["wearer_epochs_per_s"] >= batched_target,
    }
    report["machine"]["load_average_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    load = report["machine"]["load_average_1min_at_start"]
    if load is not None and load >= 1.0:
        report["machine"]["note"] = (f"other work was running (load average {load:.1f} on {os.cpu_count()} CPUs): "
                                     "wall-clock figures include waiting for a core; the cpu_* figures leave it out")
    report["seconds"] = time.perf_counter() - started
    progress(f"benchmark: done in {report['seconds']:.0f} s")
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text + "\n")
    return 0


def bench_health_export(size_mb: float) -> dict:
    """Parse a synthetic Health export of about size_mb MB of XML (zipped, as the Health app writes it)
    in a fresh process: MB of XML per second and the process's peak RSS, against an empty run's."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "export.zip"
        one = synthetic.write_health_export(path, n_nights=4)
        truth = synthetic.write_health_export(path, n_nights=4, repeat=max(1, round(size_mb * 1e6 / one["xml_bytes"])))
        progress(f"  parsing {truth['xml_bytes'] / 1e6:.0f} MB of XML in a fresh process")
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec
        code = ("import json, sys, time; import apple_health; from memory_check import status_mib; "
                "t = time.perf_counter(); "
                "e = apple_health.read_export(sys.argv[1]) if sys.argv[1] != '-' else None; "
                "print(json.dumps({'seconds': time.perf_counter() - t, 'peak_rss_mib': status_mib('VmHWM'), "
                "'records': e.report['records'] if e else 0}))")
        runs = {name: json.loads(subprocess.run([sys.executable, "-c", code, arg], cwd=ROOT, check=True,
                                                capture_output=True, text=True).stdout)
                for name, arg in (("parse", str(path)), ("imports_only", "-"))}
    parse = runs["parse"]
    return {"xml_mb": round(truth["xml_bytes"] / 1e6, 1), "records": parse["records"],
            "seconds": round(parse["seconds"], 2), "xml_mb_per_s": round(truth["xml_bytes"] / 1e6 / parse["seconds"], 1),
            "peak_rss_mib": round(parse["peak_rss_mib"], 1),
            "peak_rss_imports_only_mib": round(runs["imports_only"]["peak_rss_mib"], 1)}


def recorded_night(data_dir: Path, night: dl.Night) -> dict:
    """A night's heart-rate and counts rows inside its PSG window, duplicate timestamps removed (as the stream does)."""
    readings = realtime.recorded_readings(data_dir, night.subject_id)
    end = float(night.epoch_start_s[-1] + dl.EPOCH_S)
    out = {"n_epochs": len(night)}
    for kind in ("heart_rate", "counts"):
        rows = readings.get(kind, np.zeros((0, 2)))
        rows = rows[(rows[:, 0] >= night.epoch_start_s[0]) & (rows[:, 0] < end)]
        out[kind] = rows[np.sort(np.unique(rows[:, 0], return_index=True)[1])]
    return out


if __name__ == "__main__":
    sys.exit(main())
