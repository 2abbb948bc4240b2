"""Maps a model name ("builtin", "PROVIDER/MODEL") to the backend that serves it."""

from __future__ import annotations

from spindle_server.models.base import ModelBackend


class UnknownModelError(LookupError):
    def __init__(self, model: str, known: list[str]) -> None:
        choices = ", ".join("builtin" if p == "builtin" else f"{p}/MODEL" for p in known)
        super().__init__(f"unknown model {model!r}; use one of: {choices}")
        self.model = model


class ModelRegistry:
    """`builtin` names the builtin backend; `NAME/MODEL` asks provider NAME for MODEL.

    A bare provider name is refused: it names no model, and would otherwise reach the
    provider as the model name and fail only when a run starts."""

    def __init__(self, backends: dict[str, ModelBackend], default_model: str = "builtin") -> None:
        self._backends = dict(backends)
        self.default_model = default_model

    @property
    def providers(self) -> list[str]:
        return sorted(self._backends)

    def resolve(self, model: str) -> tuple[ModelBackend, str]:
        """Return (backend, provider's model name); raise UnknownModelError."""
        name = model or self.default_model
        if name == "builtin":
            return self._backends["builtin"], name
        provider, _, provider_model = name.partition("/")
        backend = self._backends.get(provider)
        if backend is None or provider == "builtin" or not provider_model:
            raise UnknownModelError(name, self.providers)
        return backend, provider_model

    async def aclose(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()
