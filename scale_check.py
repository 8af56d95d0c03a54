"""Scale-out figures: a synthetic cohort of thousands of nights, loaded, trained on and scored.

    python scale_check.py                            # 2,000 + 200 subjects under runs/scale (about 12 min)
    python scale_check.py --subjects 2000 --small 200 --archs hybrid,lstm --workdir runs/scale

Writes a synthetic cohort (synthetic.write_cohort: labels, heart rate, counts, steps; no raw
motion, which would be 40 GB) of --subjects nights and links its first --small nights into a
second folder, then measures, each in a fresh process so nothing else inflates the figures:

- load: feature_store.build_feature_store cold (empty cache: parse every file, write the per-night
  caches and the memory-mapped store) and cached (open the store), seconds and peak RSS;
- read: one training pass of windows through training.WindowDataset + DataLoader over every
  subject (what training reads), windows/s and peak RSS;
  both on the large and on the small cohort: the peak must not grow with the number of subjects;
- train: `train_hybrid.py` / `train.py`, one epoch on the small cohort, with 1 process and with
  `torchrun --standalone --nproc_per_node=2`; windows/s from train_log.csv (the training pass
  only, both ranks together) and the peak RSS of the largest process; and one epoch of
  `train_hybrid.py --stride 25` on each cohort, peak RSS of the real script on 200 vs 2,000 nights;
- score: `inference_hybrid.py --data-dir LARGE --workers K` for K = 1, 2, nights/s over the
  command's whole wall time (start-up, loading and writing the CSV included), and whether the two
  CSVs are identical.

Prints one JSON object (sizes in MiB) and writes it to WORKDIR/scale.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from memory_check import peak_rss_mib, progress  # standard library only: the parent stays small

HERE = Path(__file__).resolve().parent
FOLDERS = ("labels", "heart_rate", "counts", "steps")
# runs a command and reports its wall time and the peak RSS of its largest (grand)child process
WRAPPER = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.run(sys.argv[1:]).returncode; "
           "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, "
           "'peak_rss_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")


def child(mode: str, data_dir: str, cache_dir: str, stride: int) -> dict:
    """Runs in a fresh process: load the store (mode load) or read one training pass (mode read)."""
    import feature_store
    import features
    after_import = peak_rss_mib()
    t0 = time.perf_counter()
    store = feature_store.build_feature_store(data_dir, causal=False, cache_dir=cache_dir)
    out = {"subjects": len(store), "epochs": int(store.offsets[-1]), "load_seconds": round(time.perf_counter() - t0, 2)}
    if mode == "read":
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler
        import training
        data = training.prepare(store, store.subjects)
        dataset = training.WindowDataset(data, store.subjects, features.SEQ_LEN, stride, seed=0)
        loader = DataLoader(dataset, batch_size=96, sampler=DistributedSampler(dataset, num_replicas=1, rank=0, seed=0))
        t0 = time.perf_counter()
        n = sum(len(x) for x, _ in loader)
        seconds = time.perf_counter() - t0
        out.update(windows=n, read_seconds=round(seconds, 2), windows_per_s=round(n / seconds))
    out.update(rss_after_import_mib=round(after_import, 1), peak_rss_mib=round(peak_rss_mib(), 1))
    return out


def _run_child(mode: str, data_dir: Path, cache_dir: Path, stride: int = 5) -> dict:
    # the parent stays small (standard library only): Linux carries the parent's RSS at fork
    # over into the child's ru_maxrss, which would otherwise inflate the figures
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", mode, "--data-dir", str(data_dir),
                           "--cache-dir", str(cache_dir), "--stride", str(stride)],
                          capture_output=True, text=True, check=False, cwd=HERE)
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(command: list[str], env: dict | None = None) -> dict:
    """Wall seconds and peak RSS of the largest process of a command; its output goes to a log."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True,
                          cwd=HERE, env={**os.environ, **(env or {})})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return {"seconds": round(result["seconds"], 1), "peak_rss_mib": round(result["peak_rss_mib"], 1)}


def _cohort(root: Path, n: int) -> Path:
    """n synthetic nights at root (reused when already there)."""
    if not (root / "labels").is_dir() or len(list((root / "labels").iterdir())) != n:
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run([sys.executable, "synthetic.py", "--out", str(root), "--subjects", str(n), "--no-motion"],
                       check=True, cwd=HERE, stdout=subprocess.DEVNULL)
    return root


def _linked(source: Path, root: Path, n: int) -> Path:
    """The first n subjects of source, as symlinks."""
    shutil.rmtree(root, ignore_errors=True)
    ids = sorted(p.name.split("_")[0] for p in (source / "labels").iterdir())[:n]
    for folder in FOLDERS:
        (root / folder).mkdir(parents=True)
        for path in (source / folder).iterdir():
            if path.name.split("_")[0] in ids:
                os.symlink(path.resolve(), root / folder / path.name)
    return root


def _train(script: str, data_dir: Path, out_dir: Path, processes: int, stride: int, cache_dir: Path) -> dict:
    args = [script, "--data-dir", str(data_dir), "--out-dir", str(out_dir), "--epochs", "1", "--stride", str(stride)]
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
               if processes > 1 else [sys.executable, *args])
    result = _measure(command, env={"SLEEP_STAGING_CACHE": str(cache_dir)})
    with open(out_dir / "train_log.csv") as f:
        row = next(csv.DictReader(f))
    return {**result, "windows_per_s": float(row["windows_per_s"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=2000, help="nights in the large cohort")
    parser.add_argument("--small", type=int, default=200, help="nights in the small cohort (its first ones)")
    parser.add_argument("--archs", default="hybrid,lstm", help="train scripts to time: hybrid, lstm")
    parser.add_argument("--workdir", default="runs/scale")
    parser.add_argument("--child", choices=("load", "read"), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--stride", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.data_dir, args.cache_dir, args.stride)))
        return 0

    work = (HERE / args.workdir).resolve()
    t0 = time.perf_counter()
    progress(f"scale_check: writing {args.subjects} synthetic nights under {work} (reused when already there)")
    cohorts = {"large": _cohort(work / f"cohort{args.subjects}", args.subjects)}
    cohorts["small"] = _linked(cohorts["large"], work / f"cohort{args.small}", args.small)
    result: dict = {"python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "cohort_mib": round(sum(p.stat().st_size for p in cohorts["large"].rglob("*") if p.is_file()) / 2**20),
                    "write_seconds": round(time.perf_counter() - t0, 1)}
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    for name, data_dir in cohorts.items():
        progress(f"scale_check: [{name}] load, read")
        result[name] = {"load_cold": _run_child("load", data_dir, cache / name),
                        "load_cached": _run_child("load", data_dir, cache / name),
                        "read_pass": _run_child("read", data_dir, cache / name)}
    for name, data_dir in cohorts.items():
        progress(f"scale_check: [{name}] train_hybrid.py --stride 25")
        result[name]["train_hybrid_stride25"] = _train("train_hybrid.py", data_dir, work / f"train-{name}", 1, 25,
                                                       cache / name)
    result["peak_rss_growth_mib_small_to_large"] = {
        key: round(result["large"][key]["peak_rss_mib"] - result["small"][key]["peak_rss_mib"], 1)
        for key in ("load_cold", "load_cached", "read_pass", "train_hybrid_stride25")}
    result["train_small"] = {}
    for arch in args.archs.split(","):
        script = {"hybrid": "train_hybrid.py", "lstm": "train.py"}[arch]
        for processes in (1, 2):
            progress(f"scale_check: [small] {script} x{processes}")
            result["train_small"][f"{arch}_x{processes}"] = _train(script, cohorts["small"], work / f"train-{arch}-{processes}",
                                                                   processes, 5, cache / "small")
    result["score_large"] = {}
    for workers in (1, 2):
        progress(f"scale_check: [large] inference_hybrid.py --workers {workers}")
        measured = _measure([sys.executable, "inference_hybrid.py", "--data-dir", str(cohorts["large"]), "--workers",
                             str(workers), "--plots-dir", "", "--predictions-out", str(work / f"scores-{workers}.csv")],
                            env={"SLEEP_STAGING_CACHE": str(cache / "large")})
        result["score_large"][f"workers_{workers}"] = {**measured,
                                                       "nights_per_s": round(args.subjects / measured["seconds"], 1)}
    same = (work / "scores-1.csv").read_bytes() == (work / "scores-2.csv").read_bytes()
    result["score_large"]["csv_identical"] = same
    result["total_seconds"] = round(time.perf_counter() - t0)
    text = json.dumps(result, indent=2)
    (work / "scale.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
