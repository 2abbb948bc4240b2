"""Spindle client: run AI assistants on conversation threads over gRPC."""
