"""Compiled decode on CPU: one graph for the decode step, no graph breaks, no recompiles,
the same tokens as eager; via apply(compile=True) and via generate's own auto-compile."""
import pytest
import torch
from kvpolicy.tools.embedded import chat_prompt
from torch._dynamo.utils import counters
from transformers.generation.configuration_utils import CompileConfig

import kvpolicy

STEPS = 64
LONG = 256  # H2O's fixed-size ring wraps many times over


def generate(model, inputs, steps=STEPS, **kwargs):
    with torch.no_grad():  # the prefill yields the first token, then ``steps`` decode steps
        return model.generate(**inputs, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                              do_sample=False, **kwargs)


@pytest.fixture(scope="module")
def prompt(smollm2):
    return chat_prompt(smollm2[1], 100, "Summarize the text above in one sentence.")


def compiled_run(model, inputs, steps=STEPS, **kwargs):
    """(tokens, unique graphs, graph breaks) of one generate; any recompile raises."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = generate(model, inputs, steps, **kwargs)
    return out, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def test_h2o_compiled_decode(smollm2, prompt):
    model, _ = smollm2
    with kvpolicy.apply(model, "h2o", 0.1):
        eager = generate(model, prompt, LONG, return_dict_in_generate=True)
    assert eager.past_key_values.layers[0].keys.shape[-2] < prompt["input_ids"].shape[1]  # it evicts
    with kvpolicy.apply(model, "h2o", 0.1, compile=True):
        out, graphs, breaks = compiled_run(model, prompt, LONG)
    assert (graphs, breaks) == (1, 0)
    assert torch.equal(out, eager.sequences)


def test_vlcache_under_generate_auto_compile(smollm2, prompt):
    """A compileable cache lets generate compile the decode step itself (here with a
    caller's compile_config on CPU); kvpolicy's decode must stay one graph."""
    model, _ = smollm2
    with kvpolicy.apply(model, "vlcache", 0.1):
        eager = generate(model, prompt)
        config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
        config._compile_all_devices = True
        out, graphs, breaks = compiled_run(model, prompt, compile_config=config)
    assert (graphs, breaks) == (1, 0)
    assert torch.equal(out, eager)
