"""Every use of JAX's private internals (``jax._src``), each guarded, in one place.

kups-relax depends on ``jax._src`` only where JAX offers no public way to do what
:mod:`kups_relax.executables` needs to save whole compiled programs. Each function here
checks that the private API is as expected; where it is not (another JAX version), it logs a
warning once and reports failure, and the caller falls back to plain ``jax.jit`` behaviour
(the program is compiled and used, but not saved on disk) instead of crashing.

(Binding jaxlib's LAPACK kernels before a loaded program runs once used
``jax._src.lib.lapack`` too; :func:`kups_relax.executables._prepare_runtime` now does it by
lowering a small LAPACK call, which is public.)

Checked against JAX/jaxlib 0.10.2.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Iterator

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _warn_once(what: str, err: BaseException) -> None:
    logger.warning("JAX internals changed (%s: %s); compiled programs are not saved on disk", what, err)


@contextlib.contextmanager
def persistent_cache_bypassed() -> Iterator[bool]:
    """Compile without JAX's persistent compilation cache; yields whether that could be arranged.

    Why private: an executable that JAX's cache loaded serializes without its machine code
    (loading it again fails: "Function ... not found"), so only a fresh compilation may be
    saved. JAX decides once per process whether its cache is used (``_cache_checked``,
    ``_cache_used`` in ``jax._src.compilation_cache``, under ``_cache_initialized_mutex``);
    that decision is overridden for the duration. No public switch bypasses the cache for one
    compilation (``jax_enable_compilation_cache`` is read only at that first decision).
    """
    try:
        from jax._src import compilation_cache as cc

        lock, checked, used = cc._cache_initialized_mutex, cc._cache_checked, cc._cache_used
    except (ImportError, AttributeError) as err:
        _warn_once("jax._src.compilation_cache", err)
        yield False
        return
    with lock:
        cc._cache_checked, cc._cache_used = True, False
    try:
        yield True
    finally:
        with lock:
            cc._cache_checked, cc._cache_used = checked, used
