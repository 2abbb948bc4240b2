"""Facades for other assistants APIs: thin translations at the edge onto Spindle's servicers."""
