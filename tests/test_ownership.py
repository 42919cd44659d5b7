"""One owner for a generation's state: no module but the cache's own (kvpolicy/cache.py,
kvpolicy/layer.py) assigns an attribute of a PolicyCache or a KVLayer; the engine goes
through begin_call / begin_forward / end_forward / end_call. Checked on the source of the
whole package (tools, the vLLM plugin and the benchmarks included)."""
import ast
from pathlib import Path

import torch

import kvpolicy
from kvpolicy import Budget, PolicyCache, get_policy
from kvpolicy.layer import KVLayer
from tiny_lm import ids, llama  # tests/ is on sys.path (conftest)

ROOT = Path(__file__).resolve().parents[1]
OWNERS = {"kvpolicy/cache.py", "kvpolicy/layer.py"}  # compaction.py only calls KVLayer.close
HOLDERS = ("cache", "layer")  # how code names a PolicyCache or a KVLayer it holds


def state_names() -> set[str]:
    """Every instance attribute and property of a PolicyCache and its layers, after a forward."""
    model = llama()
    with kvpolicy.apply(model, "snapkv", 0.5, window=4), torch.no_grad():
        out = model.generate(ids(40), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    names = set(vars(cache)) | set(vars(cache.layers[0]))
    for cls in (PolicyCache, KVLayer):
        names |= {n for n, v in vars(cls).items() if isinstance(v, property)}
    return names


def holds_cache_state(base: ast.expr) -> bool:
    """Whether an attribute's base reads as a cache or a layer (cache, self.cache,
    cache.layers[0], layer, past_key_values, ...), not ``self`` itself."""
    text = ast.unparse(base).lower()
    return text != "self" and (any(h in text for h in HOLDERS) or "past_key_values" in text)


def outside_writes(names: set[str]) -> list[str]:
    """'file:line target' of each assignment to ``<a cache or layer>.<name>`` (or a
    setattr on one) outside the owners."""
    found = []
    files = [p for top in ("kvpolicy", "kvpolicy_kernels", "benchmarks") for p in (ROOT / top).rglob("*.py")]
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if rel in OWNERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr"
                  and node.args and holds_cache_state(node.args[0])):
                found.append(f"{rel}:{node.lineno} setattr({ast.unparse(node.args[0])}, ...)")
            for t in targets:
                for sub in ast.walk(t):
                    if (isinstance(sub, ast.Attribute) and sub.attr in names
                            and holds_cache_state(sub.value)):
                        found.append(f"{rel}:{node.lineno} {ast.unparse(sub)}")
    return found


def test_no_module_but_the_caches_writes_its_state():
    names = state_names()
    assert {"keys", "pos", "_deferral", "_history"} <= names
    assert outside_writes(names) == []


def test_the_scan_sees_an_outside_write():
    """The check itself: a module writing ``cache.recompress`` is reported."""
    bad = ROOT / "kvpolicy" / "tools" / "_ownership_probe.py"
    bad.write_text("def f(cache, run):\n    cache.recompress = False\n    cache.layers[0].given = 1\n"
                   "    run.kept = 1\n")
    try:
        assert outside_writes({"recompress", "given", "kept"}) == [
            "kvpolicy/tools/_ownership_probe.py:2 cache.recompress",
            "kvpolicy/tools/_ownership_probe.py:3 cache.layers[0].given"]
    finally:
        bad.unlink()


def test_cache_state_is_read_only_from_outside():
    cache = PolicyCache(2, get_policy("snapkv"), Budget(0.5))
    for name in ("plan", "pending", "tokens", "max_new_tokens", "defer_steps", "is_compileable"):
        try:
            setattr(cache, name, None)
        except AttributeError:
            continue
        raise AssertionError(f"PolicyCache.{name} can be assigned from outside")
