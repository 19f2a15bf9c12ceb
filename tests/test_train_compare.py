"""train.compare: the table, its baseline rows and the seed-spread sentence."""

import json

import pytest

from train import compare, input_pipeline


def _stat(mean, std):
    return {"mean": mean, "std": std, "n": 3}


def _summary(ver, r1):
    return {"verification_accuracy": _stat(*ver), "recall_at_1": _stat(*r1),
            "nmi": _stat(0.9, 0.01)}  # fmt: skip


def test_spread_sentence_says_which_differences_exceed_the_seed_spread():
    summary = {
        "arcface": _summary((0.98, 0.002), (0.96, 0.004)),
        "cosface": _summary((0.979, 0.002), (0.93, 0.004)),
        "softmax": _summary((0.95, 0.002), (0.90, 0.004)),
    }
    baselines = {"raw_pixels": _summary((0.85, 0.001), (0.61, 0.002))}
    text = compare.spread_sentence(summary, baselines)
    assert "best mean is ArcFace; CosFace is within the seed spread" in text
    assert "3 of 3 methods beat raw pixels (no model) (0.8500)" in text
    recall = compare.spread_sentence(summary, baselines, "recall_at_1")
    assert "ahead of every other method by more than the seed spread" in recall
    assert compare.separated(_stat(0.5, 0.1), _stat(0.71, 0.1))
    assert not compare.separated(_stat(0.5, 0.1), _stat(0.69, 0.1))


def test_table_has_the_baselines_as_rows():
    summary = {"cosface": _summary((0.98, 0.002), (0.96, 0.004))}
    baselines = {k: _summary((0.8, 0.0), (0.6, 0.0)) for k in compare.BASELINE_LABELS}
    table = compare.markdown_table(
        summary, steps=400, seeds=[0, 1, 2], baselines=baselines
    )
    assert "Held-out glyphs: 325 characters" in table
    assert "| CosFace | `cosface` (margin=0.35, scale=32.0) |" in table
    assert "| Raw pixels (no model) | (baseline) | 0.8000 ± 0.0000 |" in table
    assert "| Untrained network | (baseline) |" in table


def test_compare_runs_on_the_digits_base(tmp_path):
    data_dir = str(tmp_path / "tfds")
    input_pipeline.open_source("margin_jax_digits", data_dir)
    record = compare.compare(
        ["normface"], [3], str(tmp_path / "out"), steps=2, data_dir=data_dir,
        base="digits", log=lambda line: None,
    )  # fmt: skip
    assert record["base"] == "digits"
    run = record["runs"]["normface"]["3"]
    assert set(run["baselines"]) == {"raw_pixels", "untrained"}
    # The baseline rows are the runs' baselines (one seed: the values).
    for name, metrics in record["baselines"].items():
        for metric, value in metrics.items():
            assert value == {"mean": run["baselines"][name][metric], "std": 0.0, "n": 1}
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "Held-out digits 7-9" in table and "| Raw pixels (no model) |" in table
    with open(tmp_path / "out" / "compare.json") as f:
        assert json.load(f)["summary"]["normface"]["nmi"]["n"] == 1
    # A second call reads the finished run back instead of training it again.
    again = compare.compare(
        ["normface"], [3], str(tmp_path / "out"), steps=2, data_dir=data_dir,
        base="digits", log=lambda line: None,
    )  # fmt: skip
    assert again["runs"]["normface"]["3"]["nmi"] == run["nmi"]
    assert again["runs"]["normface"]["3"]["seconds"] < 1.0
    with pytest.raises(ValueError, match="valid choices: default, digits"):
        compare.method_config("normface", seed=0, steps=1, base="faces")
