"""The `taps` commands, one module each: ``HELP``, ``add_arguments(parser)`` and ``run(args)``.

A command's module turns its parsed arguments into the library's settings records and calls the
library; :mod:`pipeline.cli` finds the module by the command's name and runs it.
"""
