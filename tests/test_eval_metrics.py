"""The eval harness's metrics and report, on synthetic inputs (no model)."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy.tools.eval.metrics import kl_divergence, of_full, prefix_agreement, score_answer
from kvpolicy.tools.eval.report import format_table, kvpress_runs, summarize
from kvpolicy.tools.eval.runner import Prompt
from kvpolicy.tools.eval.tasks import Question, Sample


@pytest.mark.parametrize("text, answers, expected", [
    (" 550605.", ["550605"], 1.0),
    ("The code is 5506051", ["550605"], 0.0),   # a longer number is not the answer
    ("it is 1550605", ["550605"], 0.0),
    (" 55060", ["550605"], 0.0),
    (" Object", ["object"], 1.0),              # case-insensitive
    (" objects", ["object"], 0.0),              # whole words
    ("red 1234 and 99", ["1234", "5678"], 0.5),  # partial credit
])
def test_score_answer(text, answers, expected):
    assert score_answer(text, answers) == expected


def test_prefix_agreement():
    assert prefix_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert prefix_agreement([9, 2, 3, 4], [1, 2, 3, 4]) == 0.0
    assert prefix_agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5  # stops at the first difference
    assert prefix_agreement([1, 2], [1, 2, 3, 4]) == 0.5        # stopped early
    assert prefix_agreement([1, 2, 3, 4, 5], [1, 2, 3, 4]) == 1.0


def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(5, 300)
    assert torch.allclose(kl_divergence(logits, logits), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(kl_divergence(logits, logits + 3.0), torch.zeros(5, dtype=torch.float64), atol=1e-12)


def test_kl_matches_closed_form():
    p, q = torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5])
    kl = kl_divergence(p.log()[None], q.log()[None])
    expected = 0.75 * torch.log(torch.tensor(1.5)) + 0.25 * torch.log(torch.tensor(0.5))
    assert kl.item() == pytest.approx(expected.item(), rel=1e-6)
    assert (kl_divergence(torch.randn(4, 50), torch.randn(4, 50)) > 0).all()


def _run(policy, budget, task, score, kl=0.1, error=""):
    return {"policy": policy, "budget": budget, "sample": f"{task}-{score}", "task": task, "score": score,
            "agreement": 0.5, "kl": kl, "kl_first": kl, "kept": budget, "error": error}


def test_summarize_and_table():
    runs = [_run("h2o", 0.1, "needle", 1.0), _run("h2o", 0.1, "key_value", 0.0),
            _run("h2o", 0.5, "needle", 1.0, error="RuntimeError: boom")]
    rows = summarize(runs)
    assert [(r["policy"], r["budget"], r["samples"], r["errors"]) for r in rows] == \
        [("h2o", 0.1, 2, 0), ("h2o", 0.5, 0, 1)]
    assert rows[0]["accuracy"] == 0.5 and rows[0]["by_task"] == {"key_value": 0.0, "needle": 1.0}
    full, = summarize([_run("full", 1.0, "needle", 1.0, kl=0.0), _run("full", 1.0, "key_value", 1.0, kl=0.0)])
    table = format_table(rows, full)
    assert "full cache" in table and "h2o" in table and "failed" in table
    head = table.splitlines()[0].split()
    assert head[:5] == ["policy", "budget", "bytes", "kept", "bits"]


def test_of_full_on_two_questions_is_the_exact_bootstrap():
    """Full cache right on both, the policy on the first: resampling two questions gives
    1.0 (first twice, p=1/4), 0.5 (both, p=1/2) or 0.0 (second twice, p=1/4), so the 95%
    interval spans [0, 1] around the ratio 0.5."""
    assert of_full([1.0, 0.0], [1.0, 1.0]) == (0.5, 0.0, 1.0)
    assert of_full([1.0, 0.0, 1.0], [1.0, 0.0, 1.0]) == (1.0, 1.0, 1.0)
    assert of_full([1.0, 0.0], [0.0, 0.0]) is None  # the full cache answers nothing
    with pytest.raises(ValueError, match="2 policy scores against 3"):
        of_full([1.0, 0.0], [1.0, 1.0, 0.0])


score = st.sampled_from([0.0, 0.5, 1.0])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_of_full_invariants(data):
    """The ratio is sum(policy) / sum(full); the interval is ordered, non-negative, and the
    same on a rerun; a question the policy answers better never lowers the ratio."""
    full = data.draw(st.lists(score, min_size=1, max_size=30))
    policy = data.draw(st.lists(score, min_size=len(full), max_size=len(full)))
    got = of_full(policy, full, resamples=200)
    if sum(full) == 0:
        assert got is None
        return
    ratio, low, high = got
    assert ratio == pytest.approx(sum(policy) / sum(full))
    assert 0.0 <= low <= high
    assert of_full(policy, full, resamples=200) == got
    i = data.draw(st.integers(0, len(full) - 1))
    better = policy[:i] + [1.0] + policy[i + 1:]
    assert of_full(better, full, resamples=200)[0] >= ratio


def test_summary_rows_carry_the_share_of_the_full_cache():
    full_runs = [_run("full", 1.0, t, 1.0, kl=0.0) for t in ("needle", "key_value")]
    full_runs[0]["sample"], full_runs[1]["sample"] = "a", "b"
    runs = [_run("h2o", 0.1, "needle", 1.0), _run("h2o", 0.1, "key_value", 0.0)]
    runs[0]["sample"], runs[1]["sample"] = "a", "b"
    row, = summarize(runs, full_runs)
    assert row["of_full"] == 0.5 and row["of_full_ci95"] == [0.0, 1.0]
    assert "of_full" not in summarize(runs)[0]
    full, = summarize(full_runs)
    assert "0.50 [0.00, 1.00]" in format_table([row], full)


def test_kvpress_answers_are_scored(tmp_path):
    sample = Sample("s0", "needle", "pydoc", "doc", [Question("q?", ["123456"], "The secret code is")])
    prompt = Prompt(sample, 0, torch.tensor([[1, 2]]), torch.tensor([[3]]))
    path = tmp_path / "kvpress.json"
    path.write_text(json.dumps({"_meta": {"kvpress": "0"}, "snapkv": {
        "0.1": {prompt.id: " 123456.", "unknown": "x"}, "0.5": {prompt.id: "no"}}}))
    runs = kvpress_runs(str(path), {prompt.id: prompt})
    assert sorted((r["policy"], r["budget"], r["score"]) for r in runs) == \
        [("kvpress:snapkv", 0.1, 1.0), ("kvpress:snapkv", 0.5, 0.0)]


def test_answers_files_name_their_rows_by_label(tmp_path):
    """docs/quantized_cache_answers.py's file labels its rows "transformers:"."""
    sample = Sample("s0", "needle", "pydoc", "doc", [Question("q?", ["123456"], "The secret code is")])
    prompt = Prompt(sample, 0, torch.tensor([[1, 2]]), torch.tensor([[3]]))
    path = tmp_path / "qc.json"
    path.write_text(json.dumps({"_meta": {"label": "transformers"}, "quanto-2bit": {
        "0.0938": {prompt.id: "it is 123456"}}}))
    runs = kvpress_runs(str(path), {prompt.id: prompt})
    assert [(r["policy"], r["budget"], r["score"]) for r in runs] == [("transformers:quanto-2bit", 0.0938, 1.0)]
