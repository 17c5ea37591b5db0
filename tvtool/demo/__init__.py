"""The embedded end-to-end demo (``tvtool demo``)."""

from tvtool.demo.run import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
