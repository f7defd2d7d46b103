"""The generation protocol every backend implements, and the backend registry.

A :class:`Generator` is any model accord talks to through a backend — a teacher, a judge, CoRD's
meta-prover and integrator, a student under evaluation — so the protocol is named for what it does, not
for the teacher role.  A generator answers two calls:

- ``generate(requests, params)``: one completion per request.  A request holds the
  user prompt and, optionally, an assistant ``prefix`` to continue from (CoRD's
  step proposals continue a shared prefix until the next step header, §4.2).
  ``n`` samples of a prompt are ``n`` requests with different seeds, so every
  sample is addressable and resumable on its own.
- ``score(requests, continuations)``: the log-probability of each token of a given
  continuation after ``prompt ⊕ prefix`` (CoRD's meta-prover, App. A.1).  A backend
  that cannot do this raises :class:`NotSupported` with a message saying which can.

Stop strings are *excluded* from the returned text (OpenAI semantics), whatever
the backend does internally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from accord.errors import RunFailure, UsageError
from accord.registry import BACKENDS, load

if TYPE_CHECKING:
    from accord.config import GeneratorConfig


class NotSupported(RunFailure):
    """The backend cannot do what was asked (e.g. scoring on a chat-only server)."""


class TeacherUnavailable(RunFailure):
    """The teacher cannot be reached or loaded at all (after retries)."""


class TeacherConfigError(UsageError):
    """A teacher's settings are unusable (missing model path, unset API key variable, ...)."""


@dataclass(frozen=True)
class Request:
    prompt: str  # the user message, already styled
    prefix: str = ""  # assistant text already written; generation continues after it
    seed: int = 0


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 1024
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # also return per-token log-probs of the generated text


@dataclass
class Generation:
    text: str  # generated text only (prefix and stop string excluded)
    token_count: int = 0
    finish_reason: str = "stop"  # stop | length | error
    token_logprobs: list[float] | None = None
    error: str | None = None
    elapsed_s: float = 0.0
    stop_string: str | None = None  # which stop string ended it, if any
    meta: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.error is not None


class Generator(Protocol):
    name: str

    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Generation]: ...

    def score(self, requests: Sequence[Request], continuations: Sequence[str]) -> list[list[float]]: ...

    def close(self) -> None: ...


# "module:attr" strings so heavy backends (vllm) import only when used.
def load_generator(cfg: GeneratorConfig) -> Generator:
    backend = BACKENDS.get(cfg.backend)
    if backend is None or backend.impl is None:
        gen = [b.name for b in BACKENDS.values() if b.impl]
        raise TeacherConfigError(f"teacher {cfg.name!r}: backend {cfg.backend!r} cannot generate "
                                 f"(generating backends: {', '.join(gen)})")
    return load(backend.impl)(cfg)


def served(cfg) -> bool:
    """Whether a generator config's backend is behind a server (``Backend.remote``): calls from several threads
    at once are then safe and seeded per request (collection and CoRD ask such teachers at once)."""
    backend = BACKENDS.get(getattr(cfg, "backend", None))
    return bool(backend and backend.remote)


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """Cut ``text`` at the earliest stop string; return (text, stop or None)."""
    best, hit = len(text), None
    for s in stops:
        i = text.find(s)
        if 0 <= i < best:
            best, hit = i, s
    return text[:best], hit
