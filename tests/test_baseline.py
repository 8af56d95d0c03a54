"""The classical reference runs on the same folds and writes the same outputs as the deep models."""
import json

import numpy as np
import pandas as pd

import baseline
import data_loader as dl

PROBS = ["p_wake", "p_light", "p_deep", "p_rem"]


def test_baseline_cv_holds_out_every_subject_and_smooths_offline(small_data_dir, tmp_path, capsys):
    smooth, plain = tmp_path / "smooth", tmp_path / "plain"
    assert baseline.main(["--data-dir", str(small_data_dir), "--cv", "2", "--out-dir", str(smooth)]) == 0
    assert baseline.main(["--data-dir", str(small_data_dir), "--cv", "2", "--out-dir", str(plain), "--no-smooth"]) == 0
    a = pd.read_csv(smooth / "offline" / "cv_predictions.csv")
    b = pd.read_csv(plain / "offline" / "cv_predictions.csv")
    _, _, test = dl.split_subjects(dl.find_subjects(small_data_dir))
    assert sorted(a["subject"].astype(str).unique()) == sorted(set(dl.find_subjects(small_data_dir)) - set(test))
    assert a.groupby("subject")["fold"].nunique().eq(1).all()
    np.testing.assert_allclose(a[PROBS].sum(axis=1), 1.0, atol=1e-4)  # the CSV keeps 5 decimals
    # smoothing runs of one stage longer: fewer stage changes within each night
    changes = lambda f: int(f.groupby("subject")["pred"].apply(lambda p: (p.diff().fillna(0) != 0).sum()).sum())
    assert changes(a) < changes(b)
    assert json.loads((smooth / "offline" / "cv_summary.json").read_text())["n_folds"] == 2
    assert "mean +- sd" in capsys.readouterr().out
