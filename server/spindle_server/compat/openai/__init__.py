"""OpenAI Assistants v2 (REST + SSE) over Spindle's servicers, engine and store.

Each route parses OpenAI's JSON into the gRPC request, calls the same servicer method a gRPC
call reaches (so validation, idempotency and run logic exist once), and renders the answer with
the `openai` package's own pydantic types, so the shapes cannot drift from the SDK's.
"""
