"""How many XLA programs were compiled, and how many came from the persistent cache instead.

JAX reports every backend compilation request and every persistent-cache hit through
:mod:`jax.monitoring`; listeners registered on import count them for the whole process.
kups_relax caches every program (``jax_persistent_cache_min_compile_time_secs = 0``) and
keeps its big entry points' executables on disk (:mod:`kups_relax.executables`), so a
second run of the same job reports ``programs == 0``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.monitoring

from . import executables

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileStats(NamedTuple):
    """Programs compiled (``programs``), loaded from the persistent cache (``cached``) and seconds spent."""

    programs: int
    cached: int
    seconds: float

    def since(self, earlier: "CompileStats") -> "CompileStats":
        return CompileStats(*(a - b for a, b in zip(self, earlier)))


_totals = {"requests": 0, "hits": 0, "seconds": 0.0}


def _on_duration(event: str, duration: float, **_) -> None:
    if event == _COMPILE_EVENT:
        _totals["requests"] += 1
        _totals["seconds"] += duration


def _on_event(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _totals["hits"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


def compile_stats() -> CompileStats:
    """Totals for this process so far (see the module docstring).

    ``cached`` counts both programs JAX's cache compiled from a saved XLA program and whole
    executables :mod:`kups_relax.executables` loaded from disk (no tracing, no lowering).
    """
    hits = _totals["hits"]
    return CompileStats(_totals["requests"] - hits, hits + executables.loaded_from_disk, _totals["seconds"])
