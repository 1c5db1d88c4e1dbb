"""``msa`` commands that need only the model library (no orchestration): config, search, bench."""

from __future__ import annotations

import argparse


def _config(args: argparse.Namespace) -> int:
    from msa.config import resolve_config

    print(resolve_config(args.preset, args.set).to_json())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from msa.config import PRESETS

    config = subparsers.add_parser(
        "config",
        help="print a preset's fully resolved configuration",
        description="Print the configuration a run would use: a named preset plus --set overrides, "
        "resolved once, exactly as it is logged to MLflow and stored in checkpoints.",
    )
    config.add_argument("--preset", default="small", choices=sorted(PRESETS), help="named preset (default: small)")
    config.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one field; repeatable"
    )
    config.set_defaults(handler=_config)
