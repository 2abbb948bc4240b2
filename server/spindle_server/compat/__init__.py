"""Facades for other assistants APIs (OpenAI REST, Yandex gRPC): thin translations at the edge
onto Spindle's own servicers."""
