"""Real-world conditions, measured: cross-validation by subject, each recipe scored under each condition.

    python robustness.py                                   # every recipe, 5 folds (about an hour on 2 cores)
    python robustness.py --recipes causal-hybrid,classical-causal --folds 5
    python robustness.py --json-out runs/robustness/summary.json --markdown-out runs/robustness/table.md
    python robustness.py --merge a.json b.json             # one table from runs of different recipes
    python robustness.py --recipes causal-hybrid --revision-spans 1,6,16   # the revision over other spans too

For each fold (subject-level, over the non-test subjects, the folds `train*.py --cv` uses) every
recipe is trained as shipped (drawn real-world conditions included, see degrade.py) on the other
subjects, then the held-out nights are degraded under each condition of degrade.CONDITIONS and
staged. Reported per recipe and condition: Cohen's kappa over the out-of-fold epochs that got a
stage (pooled) and mean +- sd over folds (offline recipes also as "<recipe> unsmoothed": the same
models without whole-night smoothing); for the watch-off condition the kappa outside the
stretch and the share of scored epochs inside it that were given a stage (should be 0 offline;
causally the first NO_DATA_EPOCHS epochs of the stretch are staged, as a stream cannot know the
watch is off until then); for "heart rate every 300 s, no motion" the total sleep time error per
subject against PSG. The out-of-fold predictions of every recipe and condition go to
<json-out folder>/predictions/<recipe>/<condition>.csv (sleep_metrics.py --predictions reads them).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import baseline
import data_loader as dl
import degrade
import feature_store
import sleep_metrics as sm
import training
from checkpoint import atomic_write
from evaluation import compute_metrics, predict_nights, prediction_frame, write_predictions
from model import check_revision_span

# recipe -> (architecture, causal, overrides of the script's MODEL config); classical: the reference
RECIPES = {
    "offline-hybrid": ("hybrid", False, {}),
    "offline-lstm": ("lstm", False, {}),
    "causal-hybrid": ("hybrid", True, {}),
    "compact-causal": ("hybrid", True, {"channels": 32}),
    "classical-offline": ("classical", False, {}),
    "classical-causal": ("classical", True, {}),
}
GAP = "2 h watch off"
SPARSE = "heart rate every 300 s, no motion"


def script_recipe(arch: str, causal: bool) -> tuple[dict, training.TrainConfig]:
    """The training script's MODEL (as a dict) and TRAIN config of one mode."""
    if arch == "hybrid":
        import train_hybrid as script
    else:
        import train as script
    if causal:
        return training.script_config(script.CAUSAL_MODEL), script.CAUSAL_TRAIN
    return training.script_config(script.MODEL), script.TRAIN


def recipe_model_config(recipe: str, args: argparse.Namespace) -> dict:
    """A deep recipe's model config as trained here: the script's, the recipe's overrides, then --model."""
    arch, causal, overrides = RECIPES[recipe]
    return training.override_model_config({**script_recipe(arch, causal)[0], **overrides}, args.model)


def stage_held_out(recipe: str, nights: dict[str, dl.Night], fit_ids: list[str], held_ids: list[str],
                   fold: int, args: argparse.Namespace) -> dict[str, dict[str, pd.DataFrame]]:
    """Train one recipe on fit_ids; per variant (the recipe, and offline also its models unsmoothed)
    and condition, the prediction frame of the held-out nights."""
    arch, causal, _ = RECIPES[recipe]
    conditions = degrade.CONDITIONS.values()
    variants = {recipe: True} if causal else {recipe: True, f"{recipe} unsmoothed": False}
    if arch == "classical":
        out = {}
        for variant, smooth in variants.items():
            reference = baseline.fit(nights, fit_ids, causal, seed=args.seed + fold, smooth=smooth)
            out[variant] = {c.name: pd.concat([prediction_frame(nights[s], baseline.predict(reference, degrade.degrade(
                nights[s], c))) for s in held_ids], ignore_index=True) for c in conditions}
        return out
    defaults = script_recipe(arch, causal)[1]
    defaults = training.TrainConfig(**training.override_model_config(vars(defaults), args.train))
    model_config = recipe_model_config(recipe, args)
    cfg = replace(defaults, causal=causal, data_dir=args.data_dir, seed=args.seed, degrade=args.degrade,
                  epochs=args.epochs if args.epochs is not None else defaults.epochs,
                  ensemble=args.ensemble if args.ensemble is not None else defaults.ensemble)
    if not cfg.smoothed:  # no matrix: the recipe is its unsmoothed self
        variants = {recipe: False}
    # per variant: (revised, the revision's span; None: the model's own)
    revisions: dict[str, tuple[bool, int | None]] = {variant: (False, None) for variant in variants}
    if model_config.get("lookahead", 0) > 0:  # a causal model's revised stage beside its immediate one
        revisions[f"{recipe} revised"] = (True, None)
        variants[f"{recipe} revised"] = False
        for span in args.revision_spans:  # the same models' revisions over other spans (no training)
            revisions[f"{recipe} revised over {span}"] = (True, span)
            variants[f"{recipe} revised over {span}"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dl.DataWarning)
        store = feature_store.build_feature_store(args.data_dir, causal=causal, features=cfg.features)
    inner_train, inner_val = training.fit_split(fit_ids, cfg, fold)
    data = training.prepare(store, inner_train, cfg)
    model, _ = training.train_model(arch, model_config, cfg, data, inner_train, inner_val, None,
                                    training.Dist(), torch.device("cpu"), quiet=True,
                                    teacher_recipe=script_recipe(arch, False))
    contract = {"causal": causal, "features": list(cfg.features), "seq_len": cfg.seq_len,
                "target_pos": cfg.target_pos, "transitions": data.transitions}
    degraded = {c.name: [degrade.degrade(nights[s], c) for s in held_ids] for c in conditions}
    return {variant: {name: predict_nights(model, data.scaler, contract, held, smooth, *revisions[variant])
                      for name, held in degraded.items()} for variant, smooth in variants.items()}


def summarize(frames: dict[str, list[pd.DataFrame]], nights: dict[str, dl.Night]) -> dict:
    """Per condition: pooled and per-fold kappa (and the watch-off and total-sleep-time figures)."""
    out = {}
    for name, per_fold in frames.items():
        condition = degrade.CONDITIONS[name]
        pooled = pd.concat(per_fold, ignore_index=True)
        gap = np.concatenate([degrade.watch_off_epochs(nights[s], condition) for s in pooled["subject"].unique()])
        outside = pooled[~gap]
        kappas = [compute_metrics(f["true_stage"].to_numpy(), f["pred"].to_numpy())["kappa"] for f in per_fold]
        metrics = compute_metrics(outside["true_stage"].to_numpy(), outside["pred"].to_numpy())
        row = {"kappa": metrics["kappa"], "macro_f1": metrics["macro_f1"], "recall_light": metrics["recall_light"],
               "recall_rem": metrics["recall_rem"], "kappa_fold_mean": float(np.mean(kappas)),
               "kappa_fold_sd": float(np.std(kappas, ddof=1)) if len(kappas) > 1 else 0.0,
               "no_data_pct_of_scored": 100.0 * metrics["n_no_data"] / max(metrics["n_no_data"] + metrics["n_epochs"], 1)}
        if gap.any():
            inside = pooled[gap & (pooled["true_stage"].to_numpy() >= 0)]
            row["gap_scored_epochs"] = int(len(inside))
            row["gap_staged_pct"] = 100.0 * float((inside["pred"] >= 0).mean())
        if name == SPARSE:
            tst = sm.compare(pooled, scored_only=True)
            tst = tst[tst["metric"] == "total_sleep_time_min"]
            row["tst_error_min"] = {str(s): round(float(d), 1) for s, d in zip(tst["subject"], tst["difference"])}
            row["tst_within_60_min"] = f"{int((tst['difference'].abs() <= 60).sum())}/{len(tst)}"
        out[name] = row
    return out


REM_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


def rem_tradeoff(frame: pd.DataFrame, factors=REM_FACTORS) -> list[dict]:
    """Kappa against REM recall as the REM probability is scaled by each factor (then renormalised):
    the trade-off a REM weighting buys, on out-of-fold predictions."""
    probs = frame[["p_wake", "p_light", "p_deep", "p_rem"]].to_numpy()
    staged = ~np.isnan(probs).any(axis=1)
    out = []
    for factor in factors:
        pred = np.full(len(frame), -1)
        pred[staged] = (probs[staged] * np.array([1.0, 1.0, 1.0, factor])).argmax(axis=1)
        m = compute_metrics(frame["true_stage"].to_numpy(), pred)
        out.append({"rem_factor": factor, "kappa": m["kappa"], "recall_rem": m["recall_rem"],
                    "recall_light": m["recall_light"]})
    return out


def plot_rem_tradeoff(curves: dict[str, list[dict]], path: str | Path) -> None:
    """Kappa (y) against REM recall (x) per recipe, one point per REM factor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from evaluation import save_figure
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, points in curves.items():
        ax.plot([p["recall_rem"] for p in points], [p["kappa"] for p in points], marker="o", label=name)
        for p in points:
            ax.annotate(f"{p['rem_factor']:g}", (p["recall_rem"], p["kappa"]), fontsize=6, xytext=(2, 2),
                        textcoords="offset points")
    ax.set_xlabel("REM recall (as recorded, out of fold)")
    ax.set_ylabel("Cohen's kappa")
    ax.set_title("REM probability scaled by a factor (labels): what REM recall costs")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def markdown(summary: dict) -> str:
    """One table: kappa per recipe (columns) and condition (rows), pooled out-of-fold."""
    recipes = list(summary)
    lines = ["| condition | " + " | ".join(recipes) + " |", "|---|" + "---|" * len(recipes)]
    for name in degrade.CONDITIONS:
        cells = []
        for recipe in recipes:
            row = summary[recipe].get(name)
            if row is None:
                cells.append("-")
                continue
            cell = f"{row['kappa']:.3f}"
            if "gap_staged_pct" in row:
                cell += f" (outside; {row['gap_staged_pct']:.0f}% of the gap staged)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    tst = [f"{r}: {summary[r][SPARSE]['tst_within_60_min']}" for r in recipes if SPARSE in summary[r]]
    lines.append(f"\nTotal sleep time within 60 min of PSG ({SPARSE}), subjects: " + "; ".join(tst))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {','.join(RECIPES)}")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only-folds", default="", help="comma-separated fold numbers to run (default all)")
    parser.add_argument("--data-dir", default=str(dl.DEFAULT_DATA_DIR))
    parser.add_argument("--epochs", type=int, default=None, help="override the recipes' training epochs")
    parser.add_argument("--ensemble", type=int, default=None, help="override the recipes' ensemble size")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--train", default="", metavar="KEY=VALUE,...",
                        help="override the deep recipes' TrainConfig (screening), e.g. epochs=20,p_recorded=0.5")
    parser.add_argument("--model", default="", metavar="KEY=VALUE,...",
                        help="override the deep recipes' MODEL config (screening), e.g. channels=32")
    parser.add_argument("--tag", default="", help="appended to each recipe's name in the results, e.g. a screen's name")
    parser.add_argument("--revision-spans", default="", metavar="S,...",
                        help="recipes with a lookahead (the others ignore it): also score the same models' revision "
                             "averaged over each of these spans (the windows it averages; the model's own span is the "
                             "'revised' row)")
    parser.add_argument("--degrade", action=argparse.BooleanOptionalAction, default=True,
                        help="train the deep recipes on drawn real-world conditions (--no-degrade: as recorded; ablation)")
    parser.add_argument("--json-out", default="runs/robustness/summary.json")
    parser.add_argument("--markdown-out", default="runs/robustness/table.md")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="print (and write) one table from the summaries of earlier runs; trains nothing")
    args = parser.parse_args(argv)
    try:
        args.revision_spans = [int(span) for span in args.revision_spans.split(",") if span.strip()]
    except ValueError:
        parser.error(f"--revision-spans: comma-separated whole numbers, got {args.revision_spans!r}")
    if args.merge:
        summary = {}
        for path in args.merge:
            try:
                summary.update(json.loads(Path(path).read_text())["summary"])
            except (OSError, ValueError, KeyError) as exc:
                parser.error(f"{path}: not a robustness.py summary ({exc})")
        table = markdown(summary)
        print(table)
        atomic_write(args.markdown_out, lambda f: f.write((table + "\n").encode()))
        curves = {variant: rows["as recorded"]["rem_tradeoff"] for variant, rows in summary.items()
                  if "rem_tradeoff" in rows.get("as recorded", {})}
        if curves:
            plot_rem_tradeoff(curves, Path(args.markdown_out).with_name("rem_tradeoff.png"))
        return 0
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; known: {list(RECIPES)}")
    for recipe in recipes:  # before any training: the spans a recipe with a lookahead can average
        lookahead = 0 if RECIPES[recipe][0] == "classical" else recipe_model_config(recipe, args).get("lookahead", 0)
        for span in args.revision_spans if lookahead else ():
            try:
                check_revision_span(lookahead, span)
            except ValueError as exc:
                parser.error(f"--revision-spans {args.revision_spans}, {recipe}: {exc}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dl.DataWarning)
        nights = {n.subject_id: n for n in dl.load_nights(args.data_dir)}
    train_ids, val_ids, _ = dl.split_subjects(list(nights))
    folds = dl.kfold_subjects(train_ids + val_ids, args.folds)
    chosen = [int(f) for f in args.only_folds.split(",") if f] or range(len(folds))
    summary, t0 = {}, time.perf_counter()
    for recipe in recipes:
        frames: dict[str, dict[str, list[pd.DataFrame]]] = {}
        for k in chosen:
            fit_ids, held_ids = folds[k]
            for variant, per_condition in stage_held_out(recipe, nights, fit_ids, held_ids, k, args).items():
                variant = variant.replace(recipe, recipe + (f"[{args.tag}]" if args.tag else ""))
                for name, frame in per_condition.items():
                    frames.setdefault(variant, {}).setdefault(name, []).append(frame.assign(fold=k))
                print(f"{variant} fold {k}: " + "  ".join(
                    f"{name} {compute_metrics(f[-1]['true_stage'].to_numpy(), f[-1]['pred'].to_numpy())['kappa']:.3f}"
                    for name, f in frames[variant].items()) + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        for variant, per_condition in frames.items():
            summary[variant] = summarize(per_condition, nights)
            summary[variant]["as recorded"]["rem_tradeoff"] = rem_tradeoff(
                pd.concat(per_condition["as recorded"], ignore_index=True))
            for name, per_fold in per_condition.items():  # out-of-fold predictions, e.g. for sleep_metrics.py
                slug = name.replace(" ", "_").replace(",", "")
                write_predictions(pd.concat(per_fold, ignore_index=True),
                                  Path(args.json_out).parent / "predictions" / variant.replace(" ", "-") / f"{slug}.csv")
    table = markdown(summary)
    print("\n" + table)
    plot_rem_tradeoff({variant: rows["as recorded"]["rem_tradeoff"] for variant, rows in summary.items()},
                      Path(args.json_out).with_name("rem_tradeoff.png"))
    for path, text in ((args.json_out, json.dumps({"summary": summary, "folds": list(chosen),
                                                     "config": vars(args)}, indent=1)), (args.markdown_out, table)):
        atomic_write(path, lambda f, text=text: f.write((text + "\n").encode()))
    print(f"\nwrote {args.json_out} and {args.markdown_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
