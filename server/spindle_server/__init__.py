"""Spindle server: runs AI assistants on conversation threads over gRPC."""

__version__ = "0.1.0"
