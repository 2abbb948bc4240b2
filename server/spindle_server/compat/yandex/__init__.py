"""Yandex AI Studio's `yandex.cloud.ai.assistants.v1` gRPC API, translated onto Spindle's servicers."""
