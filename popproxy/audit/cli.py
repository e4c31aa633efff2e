"""``popproxy audit ...`` subcommands."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="work with audit files",
                           description="Verify and search audit files.")
    audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)


def run(args: argparse.Namespace) -> int:
    raise SystemExit(f"popproxy audit {args.audit_command}: not available")
