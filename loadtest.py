"""Load test of serve.py: N simulated wearers replay real nights over loopback, at accelerated time.

    python loadtest.py                                   # 1,000 wearers, both modes, 20 s each
    python loadtest.py --wearers 200 --seconds 5 --mode single

Starts `serve.py` in its own process on a fresh database, then for each mode runs every wearer at
accelerated time for --seconds: each pushes one epoch's readings every 30 / speedup seconds (the
wearers' pushes spread evenly; a wearer whose last push is still unanswered sends the next one
late, and `send_lag_p99_ms` says by how much: the server not keeping up):
- single: one POST /v1/wearers/{id}/readings per wearer-epoch (speedup 33: 1,000 wearers offer
  1,100 wearer-epochs/s);
- batch:  one POST /v1/readings per epoch for each group of --batch-wearers wearers (speedup 150:
  5,000 wearer-epochs/s).
Wearer w replays bundled night w mod 25 (heart rate and 15 s counts, times shifted to 2026),
opening its night with a flush at the night's first epoch and closing it with one at the end.
It prints JSON: wearer-epochs/s (epochs staged and answered per second, after the first interval,
in which no epoch can close yet), push latency p50/p99,
readings sent and acknowledged (the pushes' stats.accepted), epochs lost (expected and never
answered) and duplicated (answered twice), checked again against the database, and the
in-process fast path's rate (stager_batch.StagerBatch, and realtime.StagerPool) on the same
machine in the same run: the ratio of the two is the figure that travels between machines.
After each mode it restarts the server on that database and times it until it listens again (the
rebuild replays every wearer's night so far).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

import data_loader as dl
from benchmark import bench_batched, recorded_night
from checkpoint import load_model_from_checkpoint
from memory_check import progress
from serve import DEFAULT_CHECKPOINT
from serve_store import ServiceStore

ROOT = Path(__file__).resolve().parent
BASE_S = 1_767_225_600.0   # 2026-01-01T00:00:00Z, a multiple of 30 s: the nights keep their epoch grid


def night_bodies(data_dir: Path) -> list[tuple[float, list[bytes], list[int]]]:
    """Per bundled night: (start, the JSON readings body of each epoch, the readings in each)."""
    out = []
    for night in dl.load_nights(data_dir, cache_dir=None):
        readings = recorded_night(data_dir, night)
        start = float(night.epoch_start_s[0])
        bodies, n_readings = [], []
        for k in range(readings["n_epochs"]):
            lo, hi = start + 30.0 * k, start + 30.0 * (k + 1)
            body = {}
            n_readings.append(0)
            for kind in ("heart_rate", "counts"):
                rows = readings[kind][(readings[kind][:, 0] >= lo) & (readings[kind][:, 0] < hi)]
                if len(rows):
                    body[kind] = [[BASE_S + t, v] for t, v in rows.tolist()]
                    n_readings[-1] += len(rows)
            bodies.append(orjson.dumps(body))
        out.append((BASE_S + start, bodies, n_readings))
    return out


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far; None where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, db: Path, checkpoint: str, extra_args: list[str]) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", str(port), "--db", str(db),
                                "--checkpoint", checkpoint, *extra_args], cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve.py exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("serve.py did not start listening within 120 s")


class Tally:
    def __init__(self):
        self.latencies: list[float] = []
        self.lag: list[float] = []  # how late pushes left (the server not keeping up)
        self.received: dict[str, list[float]] = {}
        self.expected: dict[str, int] = {}
        self.start: dict[str, float] = {}
        self.sent = self.acknowledged = 0
        self.epochs_in_window = 0

    def answer(self, wearer: str, answer: dict, in_window: bool) -> None:
        self.received.setdefault(wearer, []).extend(e["epoch_start"] for e in answer["epochs"])
        self.acknowledged += answer["stats"]["accepted"]
        if in_window:
            self.epochs_in_window += len(answer["epochs"])


async def run_mode(url: str, mode: str, wearers: list[str], nights, seconds: float, group_size: int,
                   speedup: float) -> dict:
    import aiohttp
    tally = Tally()
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        async def post(path: str, body: bytes) -> dict:
            async with session.post(url + path, data=body) as response:
                payload = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{path}: HTTP {response.status}: {payload[:200]!r}")
                return orjson.loads(payload)

        def night_of(w: int):
            return nights[w % len(nights)]

        async def open_nights(group: list[int]) -> None:
            for w in group:
                start, _, _ = night_of(w)
                tally.start[wearers[w]] = start
                await post(f"/v1/wearers/{wearers[w]}/flush", orjson.dumps({"now": start}))

        async def close_nights(group: list[int], sent_epochs: int) -> None:
            for w in group:
                start, _, _ = night_of(w)
                answer = await post(f"/v1/wearers/{wearers[w]}/flush", orjson.dumps({"now": start + 30.0 * sent_epochs}))
                tally.answer(wearers[w], answer, False)
                tally.expected[wearers[w]] = sent_epochs

        groups = ([[w] for w in range(len(wearers))] if mode == "single"
                  else [list(range(i, min(i + group_size, len(wearers)))) for i in range(0, len(wearers), group_size)])
        await asyncio.gather(*(open_nights(g) for g in groups))
        interval = 30.0 / speedup  # seconds between one wearer's epochs: accelerated time
        t_start = time.perf_counter() + 0.5
        deadline = t_start + seconds

        async def loop(i: int, group: list[int]) -> None:
            k = 0
            n_epochs = min(len(night_of(w)[1]) for w in group)
            phase = interval * i / len(groups)  # the groups' pushes spread evenly over each interval
            while k < n_epochs:
                due = t_start + phase + k * interval
                if due >= deadline:
                    break
                await asyncio.sleep(max(due - time.perf_counter(), 0.0))
                if mode == "single":
                    w = group[0]
                    body, path = night_of(w)[1][k], f"/v1/wearers/{wearers[w]}/readings"
                else:
                    body = b"{" + b",".join(b'"' + wearers[w].encode() + b'":' + night_of(w)[1][k] for w in group) + b"}"
                    path = "/v1/readings"
                t0 = time.perf_counter()
                answer = await post(path, body)
                done = time.perf_counter()
                tally.latencies.append(done - t0)
                tally.lag.append(max(t0 - due, 0.0))
                in_window = t_start + interval <= done <= deadline  # the first interval closes nothing
                if mode == "single":
                    tally.answer(wearers[group[0]], answer, in_window)
                else:
                    for w in group:
                        tally.answer(wearers[w], answer[wearers[w]], in_window)
                tally.sent += sum(night_of(w)[2][k] for w in group)
                k += 1
            sent[tuple(group)] = k

        sent: dict[tuple, int] = {}
        await asyncio.gather(*(loop(i, g) for i, g in enumerate(groups)))
        # the nights are closed once every wearer is done, outside the measured window
        await asyncio.gather(*(close_nights(list(g), k) for g, k in sent.items()))
    lost = duplicated = 0
    for wearer, n in tally.expected.items():
        got = np.array(tally.received.get(wearer, []))
        expected = tally.start[wearer] + 30.0 * np.arange(n)
        lost += len(np.setdiff1d(expected, got))
        duplicated += len(got) - len(np.unique(got))
    latencies = np.array(tally.latencies) * 1000.0
    return {"mode": mode, "wearers": len(wearers), "group_size": 1 if mode == "single" else group_size,
            "seconds": seconds, "speedup": speedup,
            "offered_wearer_epochs_per_s": len(wearers) * speedup / 30.0, "requests": len(latencies),
            "wearer_epochs_per_s": tally.epochs_in_window / max(seconds - 30.0 / speedup, 1e-9),
            "push_p50_ms": float(np.percentile(latencies, 50)), "push_p99_ms": float(np.percentile(latencies, 99)),
            "send_lag_p99_ms": float(np.percentile(tally.lag, 99) * 1000.0),
            "readings_sent": tally.sent, "readings_acknowledged": tally.acknowledged,
            "epochs_expected": int(sum(tally.expected.values())),
            "epochs_answered": int(sum(len(v) for v in tally.received.values())),
            "epochs_lost": int(lost), "epochs_duplicated": int(duplicated), "_expected": tally.expected,
            "_start": tally.start}


def check_database(db: Path, expected: dict[str, int], start: dict[str, float]) -> dict:
    """Epochs lost and unexpected as the database holds them (its primary key refuses duplicates)."""
    store = ServiceStore(db)
    stored = {w: [e.epoch_start for e in store.epochs(w)] for w in store.epoch_counts()}
    store.close()
    lost = sum(len(np.setdiff1d(start[w] + 30.0 * np.arange(n), stored.get(w, []))) for w, n in expected.items())
    extra = sum(len(np.setdiff1d(stored.get(w, []), start[w] + 30.0 * np.arange(n))) for w, n in expected.items())
    return {"db_epochs_lost": int(lost), "db_epochs_unexpected": int(extra)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wearers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each mode's run")
    parser.add_argument("--mode", choices=["single", "batch", "both"], default="both")
    parser.add_argument("--batch-wearers", type=int, default=100, help="wearers per POST /v1/readings (batch mode)")
    parser.add_argument("--speedup-single", type=float, default=33.0,
                        help="time acceleration of single mode (33: each wearer pushes an epoch every 0.9 s)")
    parser.add_argument("--speedup-batch", type=float, default=150.0,
                        help="time acceleration of batch mode (150: an epoch every 0.2 s)")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--data-dir", default=str(dl.DEFAULT_DATA_DIR))
    parser.add_argument("--fast-path-rounds", type=int, default=10)
    parser.add_argument("--serve-args", default="", help='extra serve.py flags, e.g. "--threads 2"')
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if args.wearers < 1 or args.seconds <= 0 or args.batch_wearers < 1:
        parser.error("--wearers, --seconds and --batch-wearers must be positive")
    data_dir = Path(args.data_dir)
    progress(f"loadtest: preparing the nights in {data_dir}")
    nights = night_bodies(data_dir)
    report: dict = {"wearers": args.wearers, "checkpoint": args.checkpoint, "serve_args": args.serve_args}

    # the in-process fast path first, on its own (nothing else running)
    progress(f"loadtest: in-process fast path, {args.wearers} wearers x {args.fast_path_rounds} rounds")
    model, scaler, checkpoint = load_model_from_checkpoint(args.checkpoint)
    recorded = [recorded_night(data_dir, n) for n in dl.load_nights(data_dir, cache_dir=None)]
    fast = bench_batched(model, scaler, checkpoint, recorded, args.wearers, args.fast_path_rounds, 2, [1])
    report["in_process"] = {"stager_batch_wearer_epochs_per_s": fast["vectorised"]["wearer_epochs_per_s"],
                            "stager_pool_wearer_epochs_per_s": fast["pool"]["wearer_epochs_per_s"],
                            "model_call_only_wearer_epochs_per_s": fast["model_only"]["wearer_epochs_per_s"]}

    modes = ["single", "batch"] if args.mode == "both" else [args.mode]
    gc.collect()
    gc.freeze()  # the prepared nights stay: keep the collector's full passes from stalling the generator
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            db = Path(tmp) / f"{mode}.db"
            port = free_port()
            progress(f"loadtest: {mode} mode: starting serve.py")
            server = start_server(port, db, args.checkpoint, shlex.split(args.serve_args))
            try:
                wearers = [f"load-{mode}-{w:05d}" for w in range(args.wearers)]
                speedup = args.speedup_single if mode == "single" else args.speedup_batch
                progress(f"loadtest: {mode} mode: {args.wearers} wearers for {args.seconds:g} s")
                server_cpu, own_cpu, wall = cpu_seconds(server.pid), time.process_time(), time.perf_counter()
                result = asyncio.run(run_mode(f"http://127.0.0.1:{port}", mode, wearers, nights, args.seconds,
                                              args.batch_wearers, speedup))
                wall = time.perf_counter() - wall
                if server_cpu is not None:  # who used the two cores: the server or this load generator
                    result["server_cpu_pct"] = 100.0 * (cpu_seconds(server.pid) - server_cpu) / wall
                result["load_generator_cpu_pct"] = 100.0 * (time.process_time() - own_cpu) / wall
            finally:
                server.terminate()
                server.wait(timeout=60)
            progress(f"loadtest: {mode} mode: checking the database, then timing a restart on it")
            result.update(check_database(db, result.pop("_expected"), result.pop("_start")))
            # a restart on this database: start-up plus replaying every wearer's night so far
            started = time.perf_counter()
            server = start_server(free_port(), db, args.checkpoint, shlex.split(args.serve_args))
            result["restart_to_listening_s"] = time.perf_counter() - started
            server.terminate()
            server.wait(timeout=60)
            result["ratio_to_stager_batch"] = (result["wearer_epochs_per_s"]
                                               / report["in_process"]["stager_batch_wearer_epochs_per_s"])
            result["ratio_to_stager_pool"] = (result["wearer_epochs_per_s"]
                                              / report["in_process"]["stager_pool_wearer_epochs_per_s"])
            report[mode] = result
            progress(f"loadtest: {mode}: {result['wearer_epochs_per_s']:.0f} wearer-epochs/s, p99 "
                     f"{result['push_p99_ms']:.1f} ms, lost {result['epochs_lost']}, duplicated "
                     f"{result['epochs_duplicated']}")
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
