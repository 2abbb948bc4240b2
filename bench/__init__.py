"""Benchmarks of the Spindle client; `python -m bench` runs them and updates BENCHMARKS.md."""
