"""The ``kvpolicy`` command: list policies, run the demo, evaluate policies, inspect a plan."""
from __future__ import annotations

import argparse
import sys

from . import demo, inspect_cmd, list_cmd
from .eval import command as eval_cmd

# subcommand -> (module with add_arguments(parser) and run(args) -> int, extras it needs, help)
COMMANDS = {
    "list": (list_cmd, "", "show the registered policies and their cards"),
    "demo": (demo, "demo", "compress the embedded SmolLM2's cache on a long prompt, per policy"),
    "eval": (eval_cmd, "demo,eval", "measure quality of policies x budgets on retrieval and QA tasks"),
    "inspect": (inspect_cmd, "demo,eval", "draw which positions each layer keeps for one prompt"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvpolicy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
    args = parser.parse_args(argv)
    module, extras, _ = COMMANDS[args.command]
    try:
        return module.run(args)
    except ModuleNotFoundError as exc:  # an optional extra is missing
        print(f"kvpolicy {args.command}: {exc}; this command needs pip install 'kvpolicy[{extras}]'",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
