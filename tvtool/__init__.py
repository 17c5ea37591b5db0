"""tvtool: edit CLIP models with task vectors."""

__version__ = "0.1.0"
