"""Side-by-side measurements behind ``moetrain bench TARGET``, one module per target.

Each target keeps its options in a torch-free ``<target>_options.py`` (``add_arguments(parser)``,
what the command line builds its parser from) and its measurement in ``<target>.py``
(``main(args)``, which also runs standalone with ``python -m moetrain.bench.<module>``).
Importing this package loads nothing heavy.
"""
