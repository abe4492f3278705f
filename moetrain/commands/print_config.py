"""``moetrain config CONFIG [--set ...]``: print the resolved config; nothing is created."""

from __future__ import annotations

import argparse
import sys

from moetrain.config import config_to_yaml, load_config

__all__ = ["main_config"]


def main_config(args: argparse.Namespace) -> int:
    """Load the recipe exactly as ``train`` would and print it as YAML."""
    sys.stdout.write(config_to_yaml(load_config(args.config, args.overrides)))
    return 0
