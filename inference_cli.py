"""The inference command line behind inference.py and inference_hybrid.py, one short function per mode.

- evaluate (default): a checkpoint on nights with PSG: metrics, report, per-epoch CSV, plots;
  `--sleep-metrics` adds sleep metrics against PSG, `--workers K` scores in K processes;
- `--realtime`: the same, each night's files streamed reading by reading (realtime.StreamingStager); a
  model with a lookahead adds its revised stage (pred_revised columns, its metrics beside the immediate's);
- `--follow FILE ...`: tail growing files and print a line per closed epoch, and per revision (live demo);
- `--hr FILE` and/or `--motion FILE` (`--steps FILE`): a sleep report on a user's own recording (user_data.py);
- `--apple-health export.zip`: a report per night of an Apple Health export (apple_health.py).
"""
from __future__ import annotations

import argparse
import re
from datetime import date
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import apple_health
import data_loader as dl
import realtime
import sleep_metrics as sm
import user_data
from checkpoint import ARCHITECTURES, CheckpointError, load_model_from_checkpoint
from evaluation import (compute_metrics, describe_mode, format_report, plot_confusion, plot_hypnogram,
                        predict_nights, predict_nights_parallel, single_thread, write_predictions)
from realtime import N_VALUES, StagedEpoch, StreamingStager


def build_parser(arch: str, default_checkpoint: Path, realtime_checkpoint: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=ARCHITECTURES[arch].inference_script,
                                     description=f"Evaluate a {arch} checkpoint: metrics, per-epoch CSV, "
                                     "hypnograms, confusion matrix.")
    parser.add_argument("--checkpoint", default=None,
                        help=f"model .pth (default: shipped, {default_checkpoint}; with --realtime or --follow "
                             f"the shipped causal one, {realtime_checkpoint})")
    parser.add_argument("--data-dir", default=None,
                        help="PhysioNet-layout folder: evaluate every subject in it (default: the bundled "
                             "data's test subjects, which the shipped model never saw)")
    parser.add_argument("--subjects", nargs="*", default=None, help="only these subject ids")
    parser.add_argument("--predictions-out", default=None, help="CSV, one row per epoch")
    parser.add_argument("--plots-dir", default="out/plots",
                        help="hypnogram and confusion PNGs ('' for none): <arch>_*.png, or <arch>_realtime_*, "
                             "<arch>_causal_*, <arch>_smoothed_*.png for those modes")
    parser.add_argument("--workers", type=int, default=1,
                        help="score nights in K processes (same rows, same order as K=1)")
    parser.add_argument("--realtime", action="store_true",
                        help="replay every night's files reading by reading through the streaming predictor "
                             "(causal checkpoint); same CSV and metrics as the offline evaluation")
    parser.add_argument("--follow", nargs="+", metavar="FILE", default=None,
                        help="live demo: tail growing heart-rate / motion / counts / steps CSVs (t,bpm  t,x,y,z  "
                             "t,count  t,steps; KIND=FILE to name the kind) and print a line per closed epoch")
    parser.add_argument("--follow-timeout", type=float, default=None, metavar="S",
                        help="with --follow: stop after S seconds without new data (default: run until Ctrl-C)")
    parser.add_argument("--max-delay", type=float, default=0.0, metavar="S",
                        help="streaming: wait S seconds past an epoch's end for late readings (default 0)")
    parser.add_argument("--start-s", default=0.0, type=lambda v: None if v == "auto" else float(v),
                        help="with --follow: start of epoch 0 in the files' time base, or 'auto' (the first "
                             "reading, floored to 30 s); default 0 (PhysioNet files count from the PSG start)")
    parser.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=False,
                        help="offline checkpoints: smooth each night with the checkpoint's stage transitions (off by "
                             "default: it costs kappa for models trained on real-world conditions, docs/real_world.md)")
    parser.add_argument("--sleep-metrics", action="store_true",
                        help="also compare sleep metrics (TST, efficiency, latencies, WASO, stage minutes) with PSG: "
                             "per subject, agreement table (bias, SD, limits of agreement, MAE), Bland-Altman PNG")
    report = parser.add_argument_group("sleep report on your own recordings (user_data.py)")
    report.add_argument("--hr", metavar="FILE", default=None,
                        help="heart-rate CSV/TSV with header (time column: timestamp/time/t/seconds/datetime..., "
                             "in seconds or ISO-8601; heart_rate/hr/bpm/pulse..., a unit in brackets allowed: "
                             "'Heart Rate (bpm)'), or headerless t,bpm: stage this night (at least "
                             f"{user_data.MIN_REPORT_MIN:g} min with data; docs/reports.md)")
    report.add_argument("--motion", metavar="FILE", default=None,
                        help="raw acceleration x,y,z (g) or activity counts count/counts/activity: stage this night "
                             "(with --hr, or on its own)")
    report.add_argument("--steps", metavar="FILE", default=None, help="with --hr/--motion: steps/step_count (optional)")
    report.add_argument("--out-dir", default=None,
                        help="with --hr/--motion: where stages.csv, hypnogram.png, summary.json/.txt go "
                             "(default out/report)")
    health = parser.add_argument_group("sleep reports from an Apple Health export (apple_health.py)")
    health.add_argument("--apple-health", metavar="FILE", default=None,
                        help="export.zip from the Health app (Export All Health Data), or its export.xml: a report "
                             "per night in --out-dir/<date>/, nights.csv and diary.png (default out/health)")
    health.add_argument("--night", type=_date, default=None, metavar="YYYY-MM-DD",
                        help="with --apple-health: only the night that starts on this evening")
    health.add_argument("--since", type=_date, default=None, metavar="YYYY-MM-DD", help="with --apple-health: from this night")
    health.add_argument("--until", type=_date, default=None, metavar="YYYY-MM-DD", help="with --apple-health: to this night")
    return parser


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flags that belong to another mode, naming them."""
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.realtime and args.follow is not None:
        parser.error("--realtime and --follow are separate modes")
    if args.apple_health is None:
        given = [flag for flag, value in (("--night", args.night), ("--since", args.since), ("--until", args.until))
                 if value is not None]
        if given:
            parser.error(f"{', '.join(given)} belong(s) to --apple-health FILE")
    else:
        if args.night is not None and (args.since is not None or args.until is not None):
            parser.error("--night picks one night; --since/--until a range: give one or the other")
        if args.since is not None and args.until is not None and args.since > args.until:
            parser.error(f"--since {args.since} is after --until {args.until}")
        given = [flag for flag, on in (("--steps", args.steps is not None), ("--subjects", args.subjects is not None),
                                       ("--workers", args.workers != 1),
                                       ("--hr", args.hr is not None), ("--motion", args.motion is not None),
                                       ("--realtime", args.realtime), ("--follow", args.follow is not None),
                                       ("--data-dir", args.data_dir is not None), ("--sleep-metrics", args.sleep_metrics),
                                       ("--predictions-out", args.predictions_out is not None)) if on]
        if given:
            parser.error(f"--apple-health does not go with {', '.join(given)}")
        return
    if args.hr is None and args.motion is None:
        given = [flag for flag, value in (("--steps", args.steps), ("--out-dir", args.out_dir)) if value is not None]
        if given:
            parser.error(f"{', '.join(given)} belong(s) to a report on your own recording: give --hr FILE and/or "
                         "--motion FILE too")
        return
    given = [flag for flag, on in (("--realtime", args.realtime), ("--follow", args.follow is not None),
                                   ("--data-dir", args.data_dir is not None), ("--subjects", args.subjects is not None),
                                   ("--predictions-out", args.predictions_out is not None),
                                   ("--sleep-metrics", args.sleep_metrics)) if on]
    if given:
        parser.error(f"--hr/--motion (a report on your own recording, written to --out-dir) does not go with "
                     f"{', '.join(given)}")


def main(arch: str, default_checkpoint: Path, argv: list[str] | None = None,
         realtime_checkpoint: Path | None = None) -> int:
    realtime_checkpoint = realtime_checkpoint or ARCHITECTURES[arch].shipped(causal=True)
    parser = build_parser(arch, default_checkpoint, realtime_checkpoint)
    args = parser.parse_args(argv)
    check_args(parser, args)
    streaming = args.realtime or args.follow is not None
    if args.checkpoint is None:
        args.checkpoint = str(realtime_checkpoint if streaming else default_checkpoint)
    try:
        model, scaler, checkpoint = load_model_from_checkpoint(args.checkpoint, expected_arch=arch)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.apple_health is not None:
        return health_report(arch, args, model, scaler, checkpoint)
    if args.hr is not None or args.motion is not None:
        return user_report(arch, args, model, scaler, checkpoint)
    if args.follow is not None:
        return follow_files(arch, args, model, scaler, checkpoint)
    return evaluate(arch, args, model, scaler, checkpoint)


def make_stager(args: argparse.Namespace, model, scaler, checkpoint: dict, **kwargs) -> StreamingStager | None:
    try:
        return StreamingStager(model, scaler, checkpoint, max_delay_s=args.max_delay, **kwargs)
    except ValueError as exc:
        print(f"error: {args.checkpoint}: {exc}", file=sys.stderr)
        return None


def follow_files(arch: str, args: argparse.Namespace, model, scaler, checkpoint: dict) -> int:
    """--follow: stage growing files live."""
    stager = make_stager(args, model, scaler, checkpoint, start_s=args.start_s)
    if stager is None:
        return 1
    print(f"{arch} checkpoint {args.checkpoint} [real-time]: following {', '.join(args.follow)} (Ctrl-C to stop)",
          flush=True)
    with single_thread():
        follow(stager, args.follow, timeout_s=args.follow_timeout)
    return 0


def load_evaluation_nights(args: argparse.Namespace, checkpoint: dict) -> tuple[Path, list[dl.Night]] | None:
    """The nights to evaluate (the checkpoint's test subjects by default), warnings printed; None on error."""
    data_dir = Path(args.data_dir) if args.data_dir else dl.DEFAULT_DATA_DIR
    subjects = args.subjects
    if subjects is None and args.data_dir is None:
        subjects = checkpoint.get("test_subjects")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", dl.DataWarning)
            nights = dl.load_nights(data_dir, subjects, progress=True)
    except dl.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if not nights:
        print(f"error: no usable subjects in {data_dir}", file=sys.stderr)
        return None
    return data_dir, nights


def evaluate(arch: str, args: argparse.Namespace, model, scaler, checkpoint: dict) -> int:
    """Default and --realtime: predictions on nights with PSG, metrics, CSV, plots."""
    if args.realtime and make_stager(args, model, scaler, checkpoint) is None:  # refuses an offline checkpoint
        return 1
    t0 = time.perf_counter()
    loaded = load_evaluation_nights(args, checkpoint)
    if loaded is None:
        return 1
    data_dir, nights = loaded
    print(f"scoring {len(nights)} night(s) ({sum(len(n) for n in nights):,} epochs)"
          + (", streamed reading by reading" if args.realtime else "") + " ...", file=sys.stderr, flush=True)
    if args.realtime:
        with single_thread():
            frame = realtime.replay_nights(model, scaler, checkpoint, data_dir, nights, max_delay_s=args.max_delay)
        mode = "causal, streamed reading by reading"
    else:
        if args.workers > 1:
            frame = predict_nights_parallel(args.checkpoint, nights, args.workers, args.smooth)
        else:
            frame = predict_nights(model, scaler, checkpoint, nights, args.smooth)
        mode = describe_mode(checkpoint, args.smooth)
    print(f"{arch} checkpoint {args.checkpoint} [{mode}] on {len(nights)} subject(s) from {data_dir}: "
          f"{', '.join(n.subject_id for n in nights[:10])}{', ...' if len(nights) > 10 else ''} "
          f"({time.perf_counter() - t0:.1f} s)")
    y_true, y_pred = frame["true_stage"].to_numpy(), frame["pred"].to_numpy()
    metrics = None
    if ((y_true >= 0) & (y_pred >= 0)).any():
        metrics = compute_metrics(y_true, y_pred)
        print(format_report(metrics, y_true, y_pred))
        if "pred_revised" in frame:  # a model with a lookahead, streamed: its revised stage beside
            revised = compute_metrics(y_true, frame["pred_revised"].to_numpy())
            print(format_revised(metrics, revised, realtime.lookahead_of(model), realtime.revision_span_of(model)))
    elif (y_true >= 0).any():
        print("no PSG-scored epoch got a stage (no heart rate or motion there): no metrics")
    else:
        print("no scored epochs: predictions only")
    comparison = None
    if args.sleep_metrics:
        if metrics is None:
            print("no scored epochs: no sleep metrics against PSG")
        else:
            comparison = sm.compare(frame, scored_only=True)
            print(sm.format_sleep_metrics(comparison))
    if args.predictions_out:
        write_predictions(frame, args.predictions_out)
        print(f"wrote {len(frame)} rows to {args.predictions_out}")
    if args.plots_dir:
        plots = Path(args.plots_dir)
        stem = plot_stem(arch, args.realtime, checkpoint, mode)
        for subject, rows in frame.groupby("subject", sort=False):
            plot_hypnogram(rows, plots / f"{stem}_hypnogram_{subject}.png", f"{arch} [{mode}] subject {subject}")
        if metrics:
            plot_confusion(metrics["confusion"], plots / f"{stem}_confusion.png",
                           f"{arch} [{mode}]: kappa {metrics['kappa']:.2f}")
        if comparison is not None:
            sm.plot_bland_altman(comparison, plots / f"{stem}_bland_altman.png")
        print(f"plots in {plots}/ ({stem}_*.png)")
    return 0


def format_revised(immediate: dict, revised: dict, lookahead: int, span: int = 1) -> str:
    """The revised stage's headline figures beside the immediate stage's (compute_metrics of each)."""
    keys = ["accuracy", "kappa", "macro_f1", *(f"recall_{name.lower()}" for name in dl.STAGE_NAMES)]
    header = ["accuracy", "kappa", "macro-F1", *(f"{name} rec." for name in dl.STAGE_NAMES)]
    averaged = f", the mean of the model's {span} latest outputs for it" if span > 1 else ""
    lines = [f"revised stage: each epoch staged again {lookahead} epochs ({lookahead * 30 / 60:g} min) later"
             f"{averaged} (pred_revised)",
             f"{'':<10}" + "".join(f"{h:>11}" for h in header)]
    for name, m in (("immediate", immediate), ("revised", revised)):
        lines.append(f"{name:<10}" + "".join(f"{m[k]:>11.3f}" for k in keys))
    return "\n".join(lines) + "\n"


def plot_stem(arch: str, streamed: bool, checkpoint: dict, mode: str) -> str:
    """The plots' file-name prefix: the plain offline evaluation's is the architecture; a streamed
    run, a causal checkpoint or whole-night smoothing gets its own, so runs never overwrite each other."""
    if streamed:
        return f"{arch}_realtime"
    if checkpoint["causal"]:
        return f"{arch}_causal"
    return f"{arch}_smoothed" if "night-smoothed" in mode else arch


def health_report(arch: str, args: argparse.Namespace, model: torch.nn.Module, scaler: dl.FeatureScaler,
                  checkpoint: dict) -> int:
    """--apple-health: a report per night of a Health export, nights.csv and a sleep diary."""
    t0 = time.perf_counter()
    since, until = (args.night, args.night) if args.night else (args.since, args.until)
    try:
        export = apple_health.read_export(args.apple_health, since, until, progress=True)
        out_dir = Path(args.out_dir or "out/health")
        summaries = apple_health.report_export(model, scaler, checkpoint, export, out_dir, arch, args.checkpoint,
                                               describe_mode(checkpoint, args.smooth), args.night, args.smooth,
                                               since=args.since, until=args.until)
    except dl.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = export.report
    dropped = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in report.items()
                        if k not in ("records", "heart_rate", "steps", "sleep") and v)
    print(f"{export.path}: {report['heart_rate']:,} night-time heart-rate, {report['steps']:,} step and "
          f"{report['sleep']:,} sleep records kept of {report['records']:,}" + (f"; skipped: {dropped}" if dropped else ""))
    for summary in summaries:
        m = summary["metrics"]
        apple = summary.get("apple_stages")
        print(f"  night of {summary['subject']}: {summary['start'][11:16]}-{summary['end'][11:16]}, total sleep "
              f"{m['total_sleep_time_min'] or 0:.0f} min, efficiency {m['sleep_efficiency_pct'] or 0:.0f}%, "
              f"no data {summary['no_data_min']:.0f} min"
              + (f", agreement with Apple's stages {apple['agreement_pct']:.0f}% (kappa "
                 + ("n/a" if apple["kappa"] is None else f"{apple['kappa']:.2f}") + ")"
                 if apple and apple["agreement_pct"] is not None else ""))
    print(f"{len(summaries)} night(s) in {time.perf_counter() - t0:.1f} s: {out_dir}/<date>/, {out_dir / 'nights.csv'}, "
          f"{out_dir / 'diary.png'}")
    return 0


def user_report(arch: str, args: argparse.Namespace, model: torch.nn.Module, scaler: dl.FeatureScaler,
                checkpoint: dict) -> int:
    """--hr/--motion/--steps: stage a user's own recording; stages CSV, hypnogram, night summary."""
    t0 = time.perf_counter()
    try:
        recording = user_data.load_recording(args.hr, args.motion, args.steps)
    except dl.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    frame = user_data.predict_recording(model, scaler, checkpoint, recording, smooth=args.smooth)
    try:
        user_data.check_enough_data(frame, recording)
    except dl.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    mode = describe_mode(checkpoint, args.smooth)
    summary = user_data.night_summary(frame, recording, args.checkpoint, mode)
    out_dir = Path(args.out_dir or "out/report")
    tst = summary["metrics"]["total_sleep_time_min"]
    title = (f"{arch} [{mode}] {summary['night']}: total sleep {int(tst // 60)} h {tst % 60:.0f} min, "
             f"efficiency {summary['metrics']['sleep_efficiency_pct'] or 0:.0f}%")
    paths = user_data.write_report(frame, summary, recording, out_dir, title)
    print(user_data.format_summary(summary))
    print(f"\n{int((frame['pred'] >= 0).sum())} of {len(frame)} epochs staged in {time.perf_counter() - t0:.1f} s; wrote "
          + ", ".join(str(p) for p in paths.values()))
    return 0


# ----------------------------------------------------------------------------- following growing files (live demo)

_KIND_ALIASES = {"heart_rate": "heart_rate", "hr": "heart_rate", "heartrate": "heart_rate",
                 "motion": "motion", "acceleration": "motion", "acc": "motion",
                 "counts": "counts", "count": "counts", "steps": "steps", "step": "steps"}


class FollowedFile:
    """A growing CSV (`t,bpm`, `t,x,y,z`, `t,count`, `t,steps`; comma or space separated), read as it grows.

    spec: PATH, or KIND=PATH with KIND one of heart_rate (hr), motion (acceleration), counts, steps.
    Without a kind it comes from the name (heartrate/acceleration/counts/steps) or else the
    columns (4: motion, 2: heart rate).
    """

    def __init__(self, spec: str):
        kind, sep, path = spec.partition("=")
        if sep and kind.lower() in _KIND_ALIASES:
            self.kind, self.path = _KIND_ALIASES[kind.lower()], Path(path)
        else:
            self.kind, self.path = None, Path(spec)
            name = self.path.name.lower()
            tokens = set(re.split(r"[^a-z0-9]+", name))
            for word, kind_ in (("count", "counts"), ("step", "steps"), ("accel", "motion"), ("motion", "motion"),
                                ("heart", "heart_rate")):
                if word in name:
                    self.kind = kind_
                    break
            else:
                if "hr" in tokens:
                    self.kind = "heart_rate"
        self.offset, self.partial, self.line_no, self.bad_lines = 0, b"", 0, 0

    def read_new(self, warn=None) -> list[tuple[str, np.ndarray]]:
        """Rows appended since the last call: (kind, [t, values...]); an incomplete last line waits."""
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.offset:  # truncated or replaced: start over
            self.offset, self.partial = 0, b""
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        rows = []
        for raw in lines:
            self.line_no += 1
            fields = raw.decode("utf-8", "replace").replace(",", " ").split()
            if not fields:
                continue
            try:
                values = np.array([float(x) for x in fields])
            except ValueError:
                if self.line_no > 1:  # a header on the first line is fine
                    self._bad(warn, raw, "not a number")
                continue
            if self.kind is None:
                self.kind = "motion" if len(values) == 4 else "heart_rate"
            if len(values) != N_VALUES[self.kind] + 1:
                self._bad(warn, raw, f"expected {N_VALUES[self.kind] + 1} fields for {self.kind}")
                continue
            rows.append((self.kind, values))
        return rows

    def _bad(self, warn, raw: bytes, reason: str) -> None:
        self.bad_lines += 1
        if warn is not None:
            warn(f"{self.path}, line {self.line_no}: {reason}: {raw[:80]!r} (skipped)")


def format_epoch(epoch: StagedEpoch, start_s: float, revised: bool = False) -> str:
    """One printed line: epoch start (s), time since the night's start, stage, probabilities; a revision
    (an earlier epoch staged again, a model with a lookahead) ends in "revised"."""
    since = max(epoch.epoch_start_s - start_s, 0.0)
    hms = f"{int(since // 3600):02d}:{int(since % 3600 // 60):02d}:{int(since % 60):02d}"
    p = epoch.probabilities
    if epoch.stage < 0:
        line = f"{epoch.epoch_start_s:12.1f} s  {hms}  no data (no heart rate or motion for 10 min)"
    else:
        line = (f"{epoch.epoch_start_s:12.1f} s  {hms}  {dl.STAGE_NAMES[epoch.stage]:<5}  "
                f"wake {p[0]:.3f}  light {p[1]:.3f}  deep {p[2]:.3f}  rem {p[3]:.3f}")
    return line + ("  revised" if revised else "")


def follow(stager: StreamingStager, specs: list[str], *, timeout_s: float | None = None, poll_s: float = 0.2,
           out=None, err=None) -> int:
    """Tail growing files, push new rows (merged by time) and print one line per closed epoch, and one
    per revision as it comes (a model with a lookahead; the line ends in "revised").

    Stops after timeout_s seconds without new data (None: never) or on Ctrl-C. Returns the
    number of epochs printed (revisions not counted).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    warn = lambda message: print(f"warning: {message}", file=err, flush=True)  # noqa: E731
    files = [FollowedFile(spec) for spec in specs]
    printed, revised, last_data = 0, 0, time.monotonic()
    try:
        while True:
            rows = [row for f in files for row in f.read_new(warn)]
            if rows:
                last_data = time.monotonic()
                rows.sort(key=lambda r: r[1][0])  # stable: files in the given order at equal times
                i = 0
                while i < len(rows):  # one push per run of one signal, in time order
                    j = i
                    while j < len(rows) and rows[j][0] == rows[i][0]:
                        j += 1
                    block = np.stack([r[1] for r in rows[i:j]])
                    for epoch in stager.push(rows[i][0], block[:, 0], *block[:, 1:].T):
                        print(format_epoch(epoch, stager.start_s), file=out, flush=True)
                        printed += 1
                    for epoch in stager.take_revised():
                        print(format_epoch(epoch, stager.start_s, revised=True), file=out, flush=True)
                        revised += 1
                    i = j
            elif timeout_s is not None and time.monotonic() - last_data >= timeout_s:
                break
            else:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    summary = ", ".join(f"{k} {v}" for k, v in stager.stats.items() if v)
    revisions = f", {revised} revised" if stager.lookahead else ""
    print(f"stopped: {printed} epoch(s) staged{revisions}; {summary or 'no readings'}", file=err, flush=True)
    return printed
