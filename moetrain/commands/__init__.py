"""The command layer: one small module per ``moetrain`` subcommand.

Each command loads what it needs (a config, a checkpoint), calls library code in
:mod:`moetrain.train`, :mod:`moetrain.tasks` and :mod:`moetrain.export`, and prints. Library
modules never import this package; :mod:`moetrain.cli` only registers the commands.

Command modules import torch-heavy libraries inside their functions, not at the top: building
the parser imports every command module, and ``moetrain --help`` should take no seconds.
"""
