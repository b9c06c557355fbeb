"""Compiled programs kept on disk, so that a second process skips tracing, lowering and compiling.

JAX's persistent compilation cache saves only the XLA compilation: its key is the lowered
program, so every process still traces and lowers the relaxation loop (a large part of a
warm run). :func:`cached_jit` wraps ``jax.jit`` for
the engine's few big entry points and keys the *compiled executable* by what determines
it without tracing:

* the function (module and qualified name) and a hash of the package's source files;
* the values of the static arguments (their ``repr``) and the tree structure of the
  others (which holds every pytree's static fields), with the shape, dtype and weak type
  of every leaf;
* JAX and jaxlib versions, the device the program runs on (its kind and id: a program is
  compiled for one device, :func:`target_device`), ``jax_enable_x64`` and ``XLA_FLAGS``.

A hit loads the executable (``jax.experimental.serialize_executable``); a miss compiles
through ``jax.jit`` (which may still hit JAX's own cache) and saves the result atomically
(a temporary file renamed into place, so a killed run never leaves half a file). Calls
whose static arguments have no stable ``repr`` (a function, an object printed with its
address) are never saved.

Where they live (:func:`cache_dir`): ``kups-executables/`` inside JAX's compilation cache
folder when one is configured (``JAX_COMPILATION_CACHE_DIR``, :func:`enable_compilation_cache`,
``relax-batch``), else inside ``~/.cache/kups-relax/jax``. They hold only the engine's own
programs, so they are on by default without changing JAX's configuration. They are kept in
memory only with ``KUPS_RELAX_SAVED_EXECUTABLES=0``, with ``KUPS_RELAX_COMPILATION_CACHE=0``
and no folder configured, or with JAX's caching disabled (``jax_enable_compilation_cache``).

JAX's own persistent cache (every program of the process, however small) is the process's
to configure: importing kups-relax leaves it alone; :func:`enable_compilation_cache` switches
it on (``relax-batch`` does, unless ``KUPS_RELAX_COMPILATION_CACHE=0``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.api_util import shaped_abstractify

from . import _jax_private

logger = logging.getLogger(__name__)

#: Executables loaded from disk in this process (read by :mod:`kups_relax.compile_stats`).
loaded_from_disk = 0

_ROOT = Path(__file__).resolve().parent.parent
_SOURCE_DIRS = ("kups_relax", "potentials")
_memory: dict[str, Any] = {}


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    """Hash of every Python file of the package: any change of code gives new keys."""
    digest = hashlib.sha256()
    for name in _SOURCE_DIRS:
        for path in sorted((_ROOT / name).rglob("*.py")):
            digest.update(str(path.relative_to(_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


#: XLA options for the engine's programs on a CPU. XLA hands reductions to YNNPACK by default;
#: a YNNPACK call has a large fixed cost whatever its size, and the relaxation loop makes
#: hundreds per step (per-system dots), while XLA's own fused reductions cost a few
#: microseconds. Passed per program, so no other program in the process is touched.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options() -> dict[str, str]:
    """The XLA options the engine compiles its programs with on the default device."""
    return dict(CPU_COMPILER_OPTIONS) if jax.devices()[0].platform == "cpu" else {}


def target_device(leaves: Sequence[Any] = ()) -> jax.Device:
    """The device a jitted call with these arguments runs on: that of its first committed array
    (``jax.device_put(x, device)``), else this thread's default device (``jax.default_device``,
    which the engine sets in each device's thread), else JAX's first device."""
    for leaf in leaves:
        if isinstance(leaf, jax.Array) and leaf.committed:
            return next(iter(leaf.devices()))
    default = jax.config.jax_default_device
    if isinstance(default, str):
        return jax.devices(default)[0]
    return default or jax.devices()[0]


def _environment(device: jax.Device) -> str:
    import jaxlib

    return "|".join([jax.__version__, jaxlib.__version__, device.platform, device.device_kind, str(device.id),
                     str(jax.config.jax_enable_x64), os.environ.get("XLA_FLAGS", ""), repr(compiler_options()),
                     _source_hash()])


def default_cache_dir() -> Path:
    """kups-relax's compilation cache folder when none is configured: ``~/.cache/kups-relax/jax``."""
    return Path.home() / ".cache" / "kups-relax" / "jax"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Switch on JAX's persistent compilation cache for this process; returns its folder.

    Opt-in, because it is JAX's global configuration: it then keeps *every* program the
    process compiles (yours too), however quick to compile (JAX's default skips those under a
    second, and a warm run would still compile dozens of small ones), so running the same job
    again compiles nothing. ``relax-batch`` calls this unless ``KUPS_RELAX_COMPILATION_CACHE=0``.

    Args:
        path: the folder; default: the one already configured (``JAX_COMPILATION_CACHE_DIR``),
            else :func:`default_cache_dir`. ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``,
            when set, still chooses which programs are kept.
    """
    folder = path or jax.config.jax_compilation_cache_dir or default_cache_dir()
    jax.config.update("jax_compilation_cache_dir", os.fspath(folder))
    if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return Path(folder)


def cache_dir() -> Path | None:
    """Folder of the saved executables, or ``None`` when they are kept in memory only (module docstring)."""
    if os.environ.get("KUPS_RELAX_SAVED_EXECUTABLES") == "0" or not jax.config.jax_enable_compilation_cache:
        return None
    base = jax.config.jax_compilation_cache_dir
    if not base:
        if os.environ.get("KUPS_RELAX_COMPILATION_CACHE", "1") == "0":
            return None
        base = default_cache_dir()
    return Path(base) / "kups-executables"


def clear() -> None:
    """Forget the executables held in memory (with ``jax.clear_caches()``, to free their memory maps)."""
    _memory.clear()


@functools.lru_cache(maxsize=1)
def _prepare_runtime() -> None:
    """Do what lowering does before a program may call LAPACK: lower one LAPACK call.

    jaxlib binds its LAPACK kernels (all of them, to SciPy's) the first time a linear-algebra
    operation is lowered; an executable loaded without lowering anything would call unbound
    kernels and crash the process. (No other kernel the engine uses is bound lazily.)
    Lowering a 1x1 LU factorisation binds them through public API (milliseconds once the process
    has lowered anything; jaxlib's own ``_lapack.initialize()`` would be private). An error
    here makes the caller compile instead of loading. Only CPU programs call these kernels
    (the engine's programs run on the default device).
    """
    if jax.devices()[0].platform == "cpu":
        jax.jit(jax.lax.linalg.lu).lower(jax.ShapeDtypeStruct((1, 1), jnp.float32))


def _stable(text: str) -> bool:
    return " at 0x" not in text and "<lambda>" not in text and "<locals>" not in text


class CachedJit:
    """``jax.jit(fun, static_argnames=...)`` whose compiled programs are kept on disk (module docstring)."""

    def __init__(self, fun: Callable, static_argnames: Sequence[str] = ()):
        self.fun = fun
        self.static_argnames = tuple(static_argnames)
        self.jitted = jax.jit(fun, static_argnames=self.static_argnames)
        self.signature = inspect.signature(fun)
        self.name = f"{fun.__module__}.{fun.__qualname__}"
        functools.update_wrapper(self, fun)

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        static = {k: v for k, v in bound.arguments.items() if k in self.static_argnames}
        dynamic = {k: v for k, v in bound.arguments.items() if k not in self.static_argnames}
        leaves, treedef = jax.tree_util.tree_flatten(dynamic)
        static_text = repr(sorted(static.items()))
        tree_text = str(treedef)
        avals = ";".join(repr(shaped_abstractify(leaf)) for leaf in leaves)
        device = target_device(leaves)
        key_text = "\n".join([self.name, static_text, tree_text, avals, _environment(device)])
        key = hashlib.sha256(key_text.encode()).hexdigest()
        compiled = _memory.get(key)
        if compiled is None:
            compiled = self._load_or_compile(key, static, dynamic, device, savable=_stable(static_text + tree_text))
            _memory[key] = compiled
        return compiled(**dynamic)

    def _load_or_compile(self, key: str, static: dict, dynamic: dict, device: jax.Device, savable: bool):
        global loaded_from_disk
        from jax.experimental.serialize_executable import deserialize_and_load, serialize

        folder = cache_dir() if savable else None
        path = folder / f"{key}.exe" if folder is not None else None
        if path is not None and path.exists():
            try:
                _prepare_runtime()
                payload, in_tree, out_tree = pickle.loads(path.read_bytes())
                # onto the device it was compiled for (by default it would expect every local device)
                compiled = deserialize_and_load(payload, in_tree, out_tree, execution_devices=[device])
                loaded_from_disk += 1
                logger.debug("loaded %s from %s", self.name, path)
                return compiled
            except Exception as err:  # noqa: BLE001 -- a stale or damaged file is only a cache miss
                logger.warning("could not load the saved program %s (%s); compiling it again", path, err)
        lowered = self.jitted.lower(**static, **dynamic)
        if path is None:
            return lowered.compile(compiler_options=compiler_options())
        with _jax_private.persistent_cache_bypassed() as fresh:
            compiled = lowered.compile(compiler_options=compiler_options())
        if fresh:
            try:
                blob = pickle.dumps(serialize(compiled))
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=folder, suffix=".part", delete=False) as tmp:
                    try:
                        tmp.write(blob)
                    except BaseException:
                        os.unlink(tmp.name)
                        raise
                os.replace(tmp.name, path)
            except Exception as err:  # noqa: BLE001 -- saving is an optimisation; the run goes on
                logger.warning("could not save the compiled program %s: %s", self.name, err)
        return compiled


def cached_jit(fun: Callable | None = None, *, static_argnames: Sequence[str] = ()):
    """Decorator: :class:`CachedJit` (usable as ``@cached_jit`` or ``@cached_jit(static_argnames=...)``)."""
    if fun is None:
        return functools.partial(cached_jit, static_argnames=static_argnames)
    return CachedJit(fun, static_argnames)
