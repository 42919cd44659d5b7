"""``kvpolicy list``: the registered policies and their cards."""
from __future__ import annotations

import argparse
import textwrap

from kvpolicy import available_policies
from kvpolicy.cards import Card, card


def render(c: Card) -> str:
    params = ", ".join(f"{k}={v!r}" for k, v in c.parameters.items()) or "(none)"
    rule = textwrap.indent(c.rule.strip(), "    ")
    return (f"{c.name} - {c.title}\n  paper: {c.paper}{f' <{c.url}>' if c.url else ''}\n"
            f"  rule:\n{rule}\n  decode: {c.decode}   parameters: {params}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="policies to show (default: all)")


def run(args: argparse.Namespace) -> int:
    names = args.names or available_policies()
    print("\n\n".join(render(card(n)) for n in names))
    return 0
