"""The file-level commands extract, negate, apply, inspect and convert: one module each.

Import a command from its module (``from tvtool.commands.apply import ApplyConfig, apply``);
what they share (input checks,
provenance arguments) is :mod:`tvtool.commands.common`.
"""
