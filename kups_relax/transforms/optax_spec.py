"""Optax optimizer specs: ``"optax:adam(learning_rate=0.01)"`` and config mappings, parsed and checked.

This module reads the names; :mod:`kups_relax.transforms.optax_adapter` runs the optimizer they
name per system. It turns a spec (text or mapping) into one canonical call, fills in our
defaults, refuses what cannot run per system with the reason, and builds the
``optax.GradientTransformation`` (:func:`optax_transform`).

Only *elementwise* optax transforms are accepted: :class:`~kups_relax.transforms.OptaxTransform`
gives every atom row its own optax state, which is exactly the system's own optimizer only when
the transform acts on every coordinate separately. Transforms whose reductions span parameters
(global-norm clipping, trust ratios, factored moments, line searches) would mix systems in a
batch, or silently become a per-atom algorithm row by row, so they are refused (:data:`REFUSED`)
and the accepted names form an allowlist (:data:`OPTIMIZERS`, :data:`BUILDING_BLOCKS`).

Names follow the ``optax:<name>`` convention of JaQMC's optimizer configs (JaQMC documentation,
"Optimizers", https://bytedance.github.io/jaqmc/api-reference/optimizers.html):

* ``"optax:adam"``: ``optax.adam`` with its defaults, except ``learning_rate`` (required by
  optax) which defaults to :data:`DEFAULT_LEARNING_RATE`, and ``weight_decay``, 0 here;
* ``"optax:sgd(learning_rate=0.05, momentum=0.9, nesterov=True)"``: hyper-parameters as
  keyword (or positional) Python literals, with optax's parameter names;
* schedules where optax takes one (``learning_rate``, ``weight_decay``...):
  ``"optax:adam(learning_rate=exponential_decay(init_value=0.01, transition_steps=100, decay_rate=0.5))"``,
  any of :data:`SCHEDULES` (optax's schedules by their optax names, and JaQMC's ``standard``);
  the schedule's step is the system's own step (0 at its first step);
* ``"optax:chain(clip(max_delta=1.0), scale_by_adam(), scale(-0.01))"``: a chain of elementwise
  building blocks and optimizers (refused if any part is not elementwise);
* a mapping, as in YAML configs: ``{"name": "optax:adam", "learning_rate": {"schedule":
  "exponential_decay", "init_value": 0.01, "transition_steps": 100, "decay_rate": 0.5},
  "maxstep": 0.1}``; a chain as ``{"name": "optax:chain", "transforms": [{"name": "clip",
  "max_delta": 1.0}, "adam(learning_rate=0.01)"]}``.

``maxstep`` (Å, default :data:`DEFAULT_MAXSTEP`, ASE's) is not optax's: :func:`parse_spec`
returns it beside the optax call, for :class:`~kups_relax.transforms.MaxStepSize`.

Weight decay (``adamw``, ``lion``, ...) pulls Cartesian positions towards the origin, which has
no physical meaning and moves the minimum: it is 0 unless given explicitly (then a warning).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import logging
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

logger = logging.getLogger(__name__)

PREFIX = "optax:"

#: ``learning_rate`` when a name does not give one (optax requires it), Å per step for adam-like optimizers.
DEFAULT_LEARNING_RATE = 0.01

#: ASE's ``maxstep``, Å.
DEFAULT_MAXSTEP = 0.2

#: optax optimizers (``optax.<name>``) that act on every coordinate separately; usable as ``optax:<name>``.
OPTIMIZERS: tuple[str, ...] = tuple(name for name in (
    "adabelief", "adadelta", "adagrad", "adam", "adamax", "adamaxw", "adamw", "adan", "amsgrad", "lion",
    "nadam", "nadamw", "optimistic_adam_v2", "optimistic_gradient_descent", "radam", "rmsprop", "rprop",
    "sgd", "sign_sgd", "signum", "yogi",
) if hasattr(optax, name))

#: Elementwise optax transforms allowed inside ``optax:chain(...)`` (besides :data:`OPTIMIZERS`).
BUILDING_BLOCKS: tuple[str, ...] = tuple(name for name in (
    "add_decayed_weights", "clip", "ema", "identity", "scale", "scale_by_adadelta", "scale_by_adam",
    "scale_by_adamax", "scale_by_adan", "scale_by_amsgrad", "scale_by_belief", "scale_by_learning_rate",
    "scale_by_lion", "scale_by_optimistic_gradient", "scale_by_radam", "scale_by_rms", "scale_by_rprop",
    "scale_by_rss", "scale_by_schedule", "scale_by_sign", "scale_by_stddev", "scale_by_yogi", "trace",
) if hasattr(optax, name))

_SPANS_PARAMETERS = "reduces over many parameters at once"
#: optax transforms that cannot run per system, and why (named in the error).
REFUSED: dict[str, str] = {
    "clip_by_global_norm": "clips by the norm of all parameters together",
    "clip_by_block_rms": "clips by the RMS of whole parameter blocks",
    "adaptive_grad_clip": "clips by the norms of whole parameter blocks",
    "per_example_global_norm_clip": "clips by global norms",
    "centralize": "subtracts means over parameter blocks",
    "normalize_by_update_norm": "divides by the norm of all updates together",
    "scale_by_trust_ratio": "scales by trust ratios of whole parameter blocks",
    "lamb": "scales by layer-wise trust ratios (norms of whole parameter blocks)",
    "lars": "scales by layer-wise trust ratios (norms of whole parameter blocks)",
    "fromage": "scales by norms of whole parameter blocks",
    "scale_by_param_block_norm": "scales by norms of whole parameter blocks",
    "scale_by_param_block_rms": "scales by the RMS of whole parameter blocks",
    "adafactor": "factors second moments over the rows and columns of parameter arrays",
    "scale_by_factored_rms": "factors second moments over the rows and columns of parameter arrays",
    "sm3": "shares accumulators along parameter-array axes",
    "scale_by_sm3": "shares accumulators along parameter-array axes",
    "novograd": "keeps second moments of whole-block gradient norms",
    "scale_by_novograd": "keeps second moments of whole-block gradient norms",
    "lbfgs": "takes inner products over all parameters and a line search (use optimizer='lbfgs')",
    "scale_by_lbfgs": "takes inner products over all parameters (use optimizer='lbfgs')",
    "scale_by_zoom_linesearch": "runs a line search on the total value",
    "scale_by_backtracking_linesearch": "runs a line search on the total value",
    "polyak_sgd": "steps by the total value and the global gradient norm",
    "scale_by_polyak": "steps by the total value and the global gradient norm",
    "scale_by_distance_over_gradients": "uses global distance and gradient norms",
    "noisy_sgd": "draws noise from one random key for all parameters",
    "add_noise": "draws noise from one random key for all parameters",
    "apply_if_finite": "checks finiteness over all parameters at once",
    "zero_nans": "keeps one NaN flag per parameter block",
    "lookahead": "wraps another transform (not supported by name)",
    "masked": "takes a parameter mask (not supported by name)",
    "multi_transform": "partitions a parameter tree (not supported by name)",
    "partition": "partitions a parameter tree (not supported by name)",
    "inject_hyperparams": "wraps another transform (not supported by name)",
    "MultiSteps": "accumulates over all parameters (not supported by name)",
}


def standard(rate: float = 0.05, delay: float = 2000.0, decay: float = 1.0) -> Callable[[jax.Array], jax.Array]:
    """JaQMC's ``Standard`` schedule: ``rate * (1 / (1 + t / delay)) ** decay`` at step ``t``."""
    def schedule(count):
        return rate * (1.0 / (1.0 + count / delay)) ** decay
    return schedule


#: Learning-rate (and weight-decay) schedules by name: optax's own, and JaQMC's ``standard``.
SCHEDULES: dict[str, Callable[..., Callable]] = {
    name: getattr(optax, name) for name in (
        "constant_schedule", "cosine_decay_schedule", "cosine_onecycle_schedule", "exponential_decay",
        "linear_onecycle_schedule", "linear_schedule", "piecewise_constant_schedule",
        "piecewise_interpolate_schedule", "polynomial_schedule", "warmup_constant_schedule",
        "warmup_cosine_decay_schedule", "warmup_exponential_decay_schedule",
    ) if hasattr(optax, name)
}
SCHEDULES["standard"] = standard

#: Parameters that take pytrees, random keys or callables: not expressible by name.
_UNSUPPORTED_PARAMETERS = ("mask", "weight_decay_mask", "key", "seed")


# --- the spec: parsed, checked, written back in one canonical form -----------------------------

@dataclasses.dataclass(frozen=True)
class SpecCall:
    """One parsed call, ``name(*args, **kwargs)``.

    Values are Python literals or nested ``SpecCall``s (schedules, chain parts); after
    :func:`parse_spec` all arguments are keywords, so :meth:`render` gives the canonical text.
    """

    name: str
    args: tuple = ()
    kwargs: tuple = ()  # ((key, value), ...)

    def render(self) -> str:
        parts = [_render(v) for v in self.args] + [f"{k}={_render(v)}" for k, v in self.kwargs]
        return f"{self.name}({', '.join(parts)})"


def _render(value: Any) -> str:
    if isinstance(value, SpecCall):
        return value.render()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"non-finite value {value!r} in an optax optimizer spec")
    return repr(value)


def _check_name(name: str, context: str) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{context}: {name!r} is not a name")
    return name


def _from_ast(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            raise ValueError(f"optax spec {text!r}: {ast.unparse(node.func)!r} is not a plain name")
        if any(k.arg is None for k in node.keywords) or any(isinstance(a, ast.Starred) for a in node.args):
            raise ValueError(f"optax spec {text!r}: * and ** arguments are not supported")
        return SpecCall(node.func.id, tuple(_from_ast(a, text) for a in node.args),
                     tuple((k.arg, _from_ast(k.value, text)) for k in node.keywords))
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError):
        raise ValueError(f"optax spec {text!r}: {ast.unparse(node)!r} is neither a literal value nor a "
                         f"schedule call such as exponential_decay(init_value=0.01, ...)") from None
    return _from_value(value)


def _from_value(value: Any) -> Any:
    """A config value: a mapping with ``schedule`` (or ``name``) is a call; lists become tuples."""
    if isinstance(value, Mapping):
        if "schedule" in value or "name" in value:
            rest = dict(value)
            name = rest.pop("schedule") if "schedule" in value else rest.pop("name")
            if not isinstance(name, str):
                raise ValueError(f"optax spec {dict(value)!r}: the name must be text, got {name!r}")
            base = _parse_call(name)
            return dataclasses.replace(base, kwargs=base.kwargs + tuple(
                (str(k), _from_value(v)) for k, v in rest.items()))
        return {k: _from_value(v) for k, v in value.items()}
    if isinstance(value, str) and "(" in value:
        return _parse_call(value)
    if isinstance(value, list):
        return tuple(_from_value(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _parse_call(text: str) -> SpecCall:
    """``"adam(learning_rate=0.01)"`` or ``"adam"`` (optional ``optax:`` prefix) -> :class:`SpecCall`."""
    body = text.strip()
    if body.lower().startswith(PREFIX):
        body = body[len(PREFIX):].strip()
    if "(" not in body:
        return SpecCall(_check_name(body, f"optax spec {text!r}"))
    try:
        tree = ast.parse(body, mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"optax spec {text!r}: not of the form name(key=value, ...): {err.msg}") from None
    if not isinstance(tree, ast.Call):
        raise ValueError(f"optax spec {text!r}: not of the form name(key=value, ...)")
    return _from_ast(tree, text)


def is_optax_spec(optimizer: Any) -> bool:
    """Whether ``optimizer`` names an optax optimizer: ``"optax:..."`` or a mapping whose ``name`` does."""
    if isinstance(optimizer, Mapping):
        optimizer = optimizer.get("name")
    return isinstance(optimizer, str) and optimizer.strip().lower().startswith(PREFIX)


def parse_spec(spec: str | Mapping, warn: bool = False) -> tuple[SpecCall, float | None]:
    """The canonical top-level call of ``spec`` and the ``maxstep`` given with it (Å, or ``None``).

    Args:
        spec: ``"optax:adam(learning_rate=0.01)"`` or a mapping (see the module docstring).
        warn: log a warning for a non-zero ``weight_decay`` (once per user-facing call).

    Raises:
        ValueError: the reason a spec is not accepted (unknown or refused names, bad parameters).
    """
    if not is_optax_spec(spec):
        raise ValueError(f"{spec!r} is not an optax optimizer (names look like 'optax:adam(learning_rate=0.01)')")
    if isinstance(spec, Mapping):
        rest = dict(spec)
        transforms = rest.pop("transforms", None)
        call = _from_value(rest)
        if transforms is not None:
            if isinstance(transforms, (str, Mapping)) or not isinstance(transforms, (list, tuple)):
                raise ValueError(f"optax spec {dict(spec)!r}: 'transforms' must be a list")
            call = dataclasses.replace(call, args=call.args + tuple(
                _parse_call(t) if isinstance(t, str) else _from_value(t) for t in transforms))
    else:
        call = _parse_call(spec)
    kwargs = dict(call.kwargs)
    if len(kwargs) != len(call.kwargs):
        raise ValueError(f"optax spec {spec!r}: a parameter is given twice")
    maxstep = kwargs.pop("maxstep", None)
    if maxstep is not None and (isinstance(maxstep, bool) or not isinstance(maxstep, (int, float)) or not maxstep > 0):
        raise ValueError(f"optax spec {spec!r}: maxstep must be a number > 0 (Å), got {maxstep!r}")
    call = dataclasses.replace(call, kwargs=tuple(kwargs.items()))
    return _canonical(call, warn=warn), (float(maxstep) if maxstep is not None else None)


def _unknown(name: str, allowed: tuple[str, ...], what: str) -> ValueError:
    if name in REFUSED:
        return ValueError(
            f"optax:{name} cannot run per system: it {REFUSED[name]}, so in a batch it would mix systems "
            f"(and made per atom it would be another algorithm). Per-system optax optimizers: "
            f"{', '.join(OPTIMIZERS)}")
    close = difflib.get_close_matches(name, allowed, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    if hasattr(optax, name):
        return ValueError(f"optax:{name} is not one of the {what} known to act on every coordinate separately"
                          f"{hint}; available: {', '.join(allowed)}")
    return ValueError(f"unknown optax optimizer {name!r}{hint}; available: {', '.join(allowed)}")


def _accepts_schedule(parameter: inspect.Parameter) -> bool:
    return "Callable" in str(parameter.annotation) or "Schedule" in str(parameter.annotation)


def _canonical_schedule(call: SpecCall, owner: str, key: str) -> SpecCall:
    factory = SCHEDULES.get(call.name)
    if factory is None:
        raise ValueError(f"optax:{owner}: {key}={call.name}(...) is not a known schedule; "
                         f"available: {', '.join(SCHEDULES)}")
    signature = inspect.signature(factory)
    try:
        bound = signature.bind(*call.args, **dict(call.kwargs))
    except TypeError as err:
        raise ValueError(f"optax:{owner}: schedule {call.name}: {err}; its parameters: "
                         f"{', '.join(signature.parameters)}") from None
    for name, value in bound.arguments.items():
        if isinstance(value, SpecCall):
            raise ValueError(f"optax:{owner}: schedule {call.name}: {name} must be a value, got {value.render()}")
    return SpecCall(call.name, (), tuple(bound.arguments.items()))


def _canonical(call: SpecCall, warn: bool = False) -> SpecCall:
    """Check names and parameters, apply our defaults, and turn positional arguments into keywords."""
    if call.name == "chain":
        if any(isinstance(part, SpecCall) and part.name == "chain" for part in call.args):
            raise ValueError("optax:chain(...) cannot be nested in another chain")
        if call.kwargs:
            raise ValueError(f"optax:chain takes transforms only, got {', '.join(k for k, _ in call.kwargs)}=")
        if not call.args:
            raise ValueError("optax:chain() needs at least one transform")
        parts = []
        for part in call.args:
            if not isinstance(part, SpecCall):
                raise ValueError(f"optax:chain: {part!r} is not a transform such as scale_by_adam()")
            parts.append(_canonical_one(part, OPTIMIZERS + BUILDING_BLOCKS, "optax transforms", warn))
        return SpecCall("chain", tuple(parts))
    return _canonical_one(call, OPTIMIZERS, "optax optimizers", warn)


def _canonical_one(call: SpecCall, allowed: tuple[str, ...], what: str, warn: bool) -> SpecCall:
    if call.name not in allowed:
        if call.name in BUILDING_BLOCKS:
            raise ValueError(f"optax:{call.name} is a building block, not an optimizer: use it inside "
                             f"optax:chain(...), e.g. optax:chain({call.name}(), scale(-0.01))")
        raise _unknown(call.name, allowed, what)
    signature = inspect.signature(getattr(optax, call.name))
    kwargs = dict(call.kwargs)
    parameters = signature.parameters
    if "learning_rate" in parameters and parameters["learning_rate"].default is inspect.Parameter.empty \
            and "learning_rate" not in kwargs and not call.args:
        kwargs["learning_rate"] = DEFAULT_LEARNING_RATE
    if "weight_decay" in parameters and "weight_decay" not in kwargs \
            and len(call.args) <= list(parameters).index("weight_decay"):
        kwargs["weight_decay"] = 0.0
    try:
        bound = signature.bind(*call.args, **kwargs)
    except TypeError as err:
        raise ValueError(f"optax:{call.name}: {err}; its parameters: {', '.join(parameters)}") from None
    arguments = {}
    for key, value in bound.arguments.items():
        if key in _UNSUPPORTED_PARAMETERS and value is not None:
            raise ValueError(f"optax:{call.name}: {key} is not supported by name")
        if isinstance(value, SpecCall):
            if not _accepts_schedule(parameters[key]):
                raise ValueError(f"optax:{call.name}: {key} takes a value, not {value.render()}")
            value = _canonical_schedule(value, call.name, key)
        elif isinstance(value, (tuple, dict)):
            raise ValueError(f"optax:{call.name}: {key} must be a number, got {value!r}")
        if warn and key == "weight_decay" and value != 0.0:
            logger.warning("optax:%s with weight_decay=%s pulls positions towards the origin and moves the "
                           "minimum; it is usually not wanted in a geometry relaxation", call.name, _render(value))
        arguments[key] = value
    return SpecCall(call.name, (), tuple(arguments.items()))


def _build(call: SpecCall) -> optax.GradientTransformation:
    def value(v):
        return SCHEDULES[v.name](**dict(v.kwargs)) if isinstance(v, SpecCall) else v

    if call.name == "chain":
        return optax.chain(*(_build(part) for part in call.args))
    return getattr(optax, call.name)(**{k: value(v) for k, v in call.kwargs})


def canonical_spec(spec: str | Mapping) -> str:
    """The one-line form of an optax optimizer spec (string or mapping), defaults filled in.

    ``canonical_spec({"name": "optax:adam"}) == "optax:adam(learning_rate=0.01, ...)"``; a ``maxstep``
    given in the spec is kept (last). Raises ``ValueError`` with the reason for a bad spec.
    """
    call, maxstep = parse_spec(spec)
    if maxstep is not None:
        call = dataclasses.replace(call, kwargs=call.kwargs + (("maxstep", maxstep),))
    return PREFIX + call.render()


@functools.lru_cache(maxsize=None)
def optax_transform(spec: str) -> optax.GradientTransformation:
    """The ``optax.GradientTransformation`` a spec names, built once per spec and tried on a probe.

    ``spec`` carries no ``maxstep`` (that is :class:`~kups_relax.transforms.MaxStepSize`'s). The
    probe runs optax's ``init``/``update`` abstractly (``jax.eval_shape``) on ``(2, 3)`` rows, the
    way :class:`~kups_relax.transforms.OptaxTransform` calls them, so a bad hyper-parameter value
    is a ``ValueError`` here rather than an error inside the jitted loop.
    """
    call, maxstep = parse_spec(spec)
    if maxstep is not None:
        raise ValueError(f"{spec!r}: maxstep belongs to MaxStepSize; use optax_optimizer(...)")
    tx = _build(call)
    try:  # surface bad hyper-parameter values now, not inside the jitted loop
        probe = jnp.zeros((2, 3))
        state = jax.eval_shape(jax.vmap(tx.init), probe)
        jax.eval_shape(jax.vmap(tx.update), probe, state, probe)
    except Exception as err:  # noqa: BLE001 -- any optax failure is a bad spec
        raise ValueError(f"{spec!r}: optax could not run it: {type(err).__name__}: {err}") from None
    return tx
