"""Registry, entry-point plugins, cards and bad-input errors."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import kvpolicy
from kvpolicy import Budget, registry
from kvpolicy.cards import builtin_card, card
from kvpolicy.tools.list_cmd import render

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "registry" / "example_plugin"


@pytest.fixture
def installed_plugins(tmp_path, monkeypatch):
    """Install entry points the way pip does (a .dist-info on sys.path), then reload the registry."""

    def install(dist: str, entry_points: str) -> None:
        info = tmp_path / f"{dist}-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text(f"[kvpolicy.policies]\n{entry_points}\n")

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    monkeypatch.setattr(registry, "_policies", dict(registry._policies))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    yield install
    sys.modules.pop("kvpolicy_random", None)


def test_available_lists_seed_policies():
    assert {"prefixkv", "vlcache", "h2o", "uniform"} <= set(kvpolicy.available_policies())


def test_entry_point_plugin_is_listed_and_loads(installed_plugins):
    installed_plugins("kvpolicy_random", "random = kvpolicy_random:RandomKeep")
    assert "random" in kvpolicy.available_policies()
    policy = kvpolicy.get_policy("random", seed=3)
    assert type(policy).__name__ == "RandomKeep" and policy.seed == 3
    assert "seed=0" in render(card("random"))


def test_broken_plugin_warns_and_spares_the_others(installed_plugins):
    installed_plugins("broken_plugin", "broken = no_such_module_xyz:Nope\n"
                                       "random = kvpolicy_random:RandomKeep")
    with pytest.warns(UserWarning, match="'broken'"):
        names = kvpolicy.available_policies()
    assert "random" in names and "broken" not in names


def test_unknown_name_lists_available_and_closest():
    with pytest.raises(kvpolicy.UnknownPolicyError, match=r"'vlcach'.*'vlcache'.*h2o"):
        kvpolicy.get_policy("vlcach")


def test_wrong_parameter_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"no parameter 'windw'.*window=32"):
        kvpolicy.get_policy("snapkv", windw=16)


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, 0, -3, True, "0.1", None])
def test_bad_budgets_explain_themselves(value):
    with pytest.raises((ValueError, TypeError), match="budget"):
        Budget(value)


def test_budget_totals():
    assert Budget(0.1).total(1000, 30) == 3000
    assert Budget(64).total(1000, 30) == 64 * 30


@pytest.mark.parametrize("name", ["expected_attention", "h2o", "keydiff", "kvzip", "kvzip_floor",
                                  "prefixkv", "pyramidkv", "snapkv", "spankv",
                                  "streamingllm", "tova", "uniform", "vlcache"])
def test_builtin_cards_match_the_code(name):
    c = builtin_card(name)
    cls = kvpolicy.policy_class(name)
    assert c is not None and c.name == name and c.decode == cls.decode
    assert c.parameters == cls.defaults()
    assert len(c.rule.strip().splitlines()) == 2
    assert cls.__doc__.startswith(c.rule.strip())  # the rule is written once, in the card


def test_cli_list_prints_cards(capsys):
    from kvpolicy.tools.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ["h2o", "prefixkv", "vlcache", "uniform"]:
        assert f"\n{name} - " in "\n" + out
