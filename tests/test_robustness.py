"""robustness.py end to end on a few real nights: one fold, one pass, a tiny causal model with a lookahead."""
import json

import pytest

import robustness


def run(small_data_dir, tmp_path, *extra):
    return robustness.main(["--data-dir", str(small_data_dir), "--recipes", "causal-hybrid", "--folds", "2",
                            "--only-folds", "0", "--epochs", "1", "--train", "seq_len=25,stride=25,batch_size=64",
                            "--model", "channels=8,dilated=2,lookahead=4,revision_span=1", "--json-out", str(tmp_path / "s.json"),
                            "--markdown-out", str(tmp_path / "s.md"), *extra])


def test_the_revision_is_scored_over_other_spans_from_the_same_models(small_data_dir, tmp_path):
    assert run(small_data_dir, tmp_path, "--revision-spans", "1,5", "--tag", "t") == 0
    summary = json.loads((tmp_path / "s.json").read_text())["summary"]
    assert set(summary) == {"causal-hybrid[t]", "causal-hybrid[t] revised", "causal-hybrid[t] revised over 1",
                            "causal-hybrid[t] revised over 5"}
    rows = {variant: summary[variant]["as recorded"]["kappa"] for variant in summary}
    # the model's own span is 1: the same revision; over all 5 windows it is another one
    assert rows["causal-hybrid[t] revised over 1"] == rows["causal-hybrid[t] revised"]
    revised = (tmp_path / "predictions" / "causal-hybrid[t]-revised" / "as_recorded.csv").read_text()
    over_5 = (tmp_path / "predictions" / "causal-hybrid[t]-revised-over-5" / "as_recorded.csv").read_text()
    assert revised == (tmp_path / "predictions" / "causal-hybrid[t]-revised-over-1" / "as_recorded.csv").read_text()
    assert over_5 != revised
    assert "revised over 5" in (tmp_path / "s.md").read_text()


def test_a_span_longer_than_the_lookahead_allows_is_refused_before_training(small_data_dir, tmp_path, capsys):
    for spans, message in (("6", "causal-hybrid: revision_span must be 1 .. lookahead + 1 = 5, got 6"),
                           ("0", "causal-hybrid: revision_span must be 1 .. lookahead + 1 = 5, got 0"),
                           ("two", "--revision-spans: comma-separated whole numbers, got 'two'")):
        with pytest.raises(SystemExit):
            run(small_data_dir, tmp_path, "--revision-spans", spans)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
