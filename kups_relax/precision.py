"""64-bit JAX types for kups-relax's own calls, without touching JAX's global configuration.

The engine works in float64 by default (ASE parity) and indexes with int64 where rows can be
many, so its programs need JAX's 64-bit types. Switching them on for the whole process
(``jax.config.update("jax_enable_x64", True)``) would also change every other JAX model the
user runs beside it (their float32 arrays silently become float64, their programs
recompile). Instead every public entry point that makes device arrays or runs a program is
decorated with :func:`x64`: it runs under ``jax.enable_x64(True)``, JAX's own context
manager, which is *thread-local* and part of every jit cache key (a function jitted in both
modes keeps one program per mode). ``dtype="float32"`` runs use the same scope, so their
programs are those they always were (float32 values, 64-bit indices).

What stays outside the scope, in the caller's mode:

* the caller's own code between the items of a generator (:func:`kups_relax.relax_iter`):
  the scope is entered around each step of the inner generator, never held across a
  ``yield``;
* user code our entry points call back, when named in ``user_code``: callbacks
  (``on_result``) and lazily read iterators of structures run in the mode of the caller.

Device arrays our functions keep between calls (an ASE calculator's neighbor list, an
optimizer's state) are only used inside the scope; what they return is NumPy (float64).
Threads started inside the scope do not inherit it (the CLI's writer thread only writes
NumPy arrays).

Lower-level modules (:mod:`kups_relax.neighbors`, :mod:`kups_relax.loop`,
:mod:`kups_relax.transforms`, ...) follow whatever mode they are called in: wrap such calls
in ``with jax.enable_x64(True):`` (or enable x64 for the process, as the test suite and the
benchmarks do) to get float64 and the engine's programs.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
from typing import Callable, Generator, Iterator, Sequence, TypeVar

import jax

F = TypeVar("F", bound=Callable)


def enabled() -> bool:
    """Whether 64-bit types are on in this thread now (the global setting or a scope)."""
    return bool(jax.config.jax_enable_x64)


def x64(fun: F | None = None, *, user_code: Sequence[str] = ()) -> F:
    """Decorator: run ``fun`` with JAX's 64-bit types on (``jax.enable_x64(True)``), in this thread only.

    A generator (``fun`` returns one, or is a generator function) keeps the scope while it
    computes each item and leaves it before handing the item over, so the caller's code
    between items runs in its own mode; closing it closes ``fun``'s generator in the scope.
    ``user_code`` names arguments holding the caller's code: a callable is called, and an
    iterator (a generator of structures, not a list) is advanced, in the caller's mode.
    """
    if fun is None:
        return functools.partial(x64, user_code=tuple(user_code))  # type: ignore[return-value]
    signature = inspect.signature(fun) if user_code else None

    def in_caller_mode(args, kwargs, caller: list[bool]):
        if signature is None:
            return args, kwargs
        bound = signature.bind(*args, **kwargs)
        for name in user_code:
            value = bound.arguments.get(name)
            if isinstance(value, collections.abc.Iterator):
                bound.arguments[name] = _advanced_in(value, caller)
            elif callable(value):
                bound.arguments[name] = _called_in(value, caller)
        return bound.args, bound.kwargs

    @functools.wraps(fun)
    def function(*args, **kwargs):
        caller = [enabled()]
        args, kwargs = in_caller_mode(args, kwargs, caller)
        with jax.enable_x64(True):
            result = fun(*args, **kwargs)
        return _stepped_in_scope(result, caller) if inspect.isgenerator(result) else result

    return function  # type: ignore[return-value]


def _stepped_in_scope(inner: Generator, caller: list[bool]) -> Generator:
    """``inner``'s items, each computed in the scope; the scope is left before each is handed over."""
    try:
        while True:
            caller[0] = enabled()
            with jax.enable_x64(True):
                try:
                    item = next(inner)
                except StopIteration as stop:
                    return stop.value
            yield item
    finally:
        with jax.enable_x64(True):
            inner.close()


def _called_in(callback: Callable, caller: list[bool]) -> Callable:
    @functools.wraps(callback)
    def call(*args, **kwargs):
        with jax.enable_x64(caller[0]):
            return callback(*args, **kwargs)

    return call


def _advanced_in(items: Iterator, caller: list[bool]) -> Iterator:
    while True:
        with jax.enable_x64(caller[0]):
            try:
                item = next(items)
            except StopIteration:
                return
        yield item


#: The floating-point types a run can use.
DTYPE_CHOICES = ("float64", "float32")


def default_dtype(potential) -> str:
    """The precision a potential runs in when the caller does not choose: its ``default_dtype``
    attribute (``"float32"`` for learned potentials such as SevenNet, as their reference
    implementations run), else ``"float64"`` (classical potentials: ASE parity)."""
    dtype = getattr(potential, "default_dtype", "float64")
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"{type(potential).__name__}.default_dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    return dtype


def resolve_dtype(dtype: str | None, potential) -> str:
    """``dtype`` if given (``"float64"`` or ``"float32"``), else :func:`default_dtype` of ``potential``."""
    if dtype is None:
        return default_dtype(potential)
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)} or None (the potential's default), "
                         f"got {dtype!r}")
    return dtype
