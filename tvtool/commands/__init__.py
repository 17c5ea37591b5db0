"""The file-level commands extract, negate, apply, inspect, convert and export-peft.

One module each; :mod:`~tvtool.commands.peft_interop` holds ``export-peft`` and the peft
adapter branch of ``convert``.

Import a command from its module (``from tvtool.commands.apply import ApplyConfig, apply``);
what they share (input checks,
provenance arguments) is :mod:`tvtool.commands.common`.
"""
