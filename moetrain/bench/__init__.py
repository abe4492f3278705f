"""Side-by-side measurements behind ``moetrain bench TARGET``, one module per target.

Each module has ``add_arguments(parser)`` and ``main(args)`` and runs standalone with
``python -m moetrain.bench.<module>``. Modules are imported on demand; importing this
package loads nothing heavy.
"""
