"""The ``kvpolicy`` command: list policies, run the demo, evaluate policies."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module with add_arguments(parser) and run(args) -> int
COMMANDS = {
    "list": ("kvpolicy.cards", "show the registered policies and their cards"),
    "demo": ("kvpolicy.demo", "compress the embedded SmolLM2's cache on a long prompt, per policy"),
    "eval": ("kvpolicy.evaluate", "measure quality of policies x budgets on retrieval and QA tasks"),
    "inspect": ("kvpolicy.inspection", "draw which positions each layer keeps for one prompt"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvpolicy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:  # e.g. optional extras missing
            p = sub.add_parser(name, help=f"{help_text} (unavailable: {exc})")
            p.set_defaults(run=lambda args, exc=exc: _unavailable(exc))
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    args = parser.parse_args(argv)
    return args.run(args)


def _unavailable(exc: Exception) -> int:
    print(f"kvpolicy: this command needs an optional dependency: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
