"""Peak memory of loading raw-motion nights: one long 50 Hz night, then N subjects in one process.

    python memory_check.py [--hours 10] [--subjects 1,5,10] [--workdir DIR]

Writes one synthetic night (synthetic.write_night: labels, heart rate, raw 50 Hz motion, steps,
counts) into a temporary folder, then, each in a fresh Python process so that nothing else
inflates the figures:

- `single`: data_loader.parse_night on it, peak RSS (getrusage ru_maxrss; VmHWM agrees) and time;
- `subjects`: for each N, data_loader.load_nights (no cache) on N subjects that share the
  same files through symlinks under different ids; peak RSS after every subject.

A night is reduced to per-epoch aggregates as soon as it is parsed and the raw arrays are
dropped, so the peak must not grow with N. Prints one JSON object; sizes in MiB.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUBJECT = "9000000"


_STARTED = time.perf_counter()


def progress(message: str) -> None:
    """One line on stderr for a step that takes a while (stdout carries the JSON), with the seconds
    since the script started: long runs are not silent."""
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak of this process image) from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def child(mode: str, data_dir: str, ids: list[str], hours: float = 10.0) -> dict:
    """Runs in a fresh process: write the night, or import, load and measure."""
    if mode == "write":
        import synthetic
        t0 = time.perf_counter()
        paths = synthetic.write_night(data_dir, ids[0], synthetic.SyntheticNightConfig(hours=hours))
        return {"paths": {kind: str(path) for kind, path in paths.items()},
                "write_seconds": round(time.perf_counter() - t0, 1)}
    import data_loader as dl
    after_import = peak_rss_mib()
    t0 = time.perf_counter()
    if mode == "single":
        night = dl.parse_night(data_dir, ids[0])
        out = {"epochs": len(night), "motion_source": night.report.get("motion_source")}
    else:
        peaks, nights = [], []
        for subject_id in ids:
            nights.extend(dl.load_nights(data_dir, [subject_id], strict=True, cache_dir=None))
            peaks.append(round(peak_rss_mib(), 1))
        out = {"subjects": len(nights), "peak_rss_mib_after_each_subject": peaks}
    out.update({"seconds": round(time.perf_counter() - t0, 2), "rss_after_import_mib": round(after_import, 1),
                "peak_rss_mib": round(peak_rss_mib(), 1), "vm_hwm_mib": round(status_mib("VmHWM"), 1),
                "rss_at_end_mib": round(status_mib("VmRSS"), 1)})
    return out


def _run_child(mode: str, data_dir: Path, ids: list[str], hours: float = 10.0) -> dict:
    # the parent stays small (standard library only): Linux carries the parent's RSS at fork
    # over into the child's ru_maxrss, which would otherwise inflate the figures
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", mode, "--data-dir", str(data_dir),
                           "--ids", ",".join(ids), "--hours", str(hours)],
                          capture_output=True, text=True, check=False, cwd=HERE)
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _linked_cohort(source: dict[str, Path], root: Path, n: int) -> list[str]:
    """n subject ids whose files are symlinks to the one written night."""
    ids = [str(int(SUBJECT) + 1 + i) for i in range(n)]
    for subject_id in ids:
        for kind, path in source.items():
            target = root / path.parent.name / path.name.replace(SUBJECT, subject_id, 1)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.symlink(path, target)
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hours", type=float, default=10.0, help="length of the synthetic night")
    parser.add_argument("--subjects", default="1,5,10", help="comma-separated N to load in one process")
    parser.add_argument("--workdir", default=None, help="where to write the night (default: a temporary folder)")
    parser.add_argument("--child", choices=("write", "single", "subjects"), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.data_dir, args.ids.split(","), args.hours)))
        return 0

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        progress(f"memory_check: writing a {args.hours:g} h synthetic night with raw 50 Hz motion")
        written = _run_child("write", tmp / "one", [SUBJECT], args.hours)
        paths = {kind: Path(path) for kind, path in written["paths"].items()}
        with open(paths["motion"], "rb") as f:
            motion_rows = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        progress("memory_check: parsing it in a fresh process (peak memory)")
        result = {
            "python": sys.version.split()[0],
            "night_hours": args.hours,
            "motion_file_mib": round(paths["motion"].stat().st_size / 2**20, 1),
            "motion_rows": motion_rows,
            "all_files_mib": round(sum(p.stat().st_size for p in paths.values()) / 2**20, 1),
            "write_seconds": written["write_seconds"],
            "single": _run_child("single", tmp / "one", [SUBJECT]),
            "subjects": {},
        }
        for n in (int(x) for x in args.subjects.split(",")):
            progress(f"memory_check: loading {n} subject(s) in one process")
            ids = _linked_cohort(paths, tmp / "cohort", n)
            result["subjects"][str(n)] = _run_child("subjects", tmp / "cohort", ids)
        peaks = [r["peak_rss_mib"] for r in result["subjects"].values()]
        result["peak_growth_mib_from_smallest_to_largest_n"] = round(peaks[-1] - peaks[0], 1) if peaks else None
    progress("memory_check: done")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
