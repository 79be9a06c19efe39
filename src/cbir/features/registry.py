"""The descriptor registry: a name table of descriptor classes, as timm's ``register_model``.

``create_descriptor("lbp:P=16,R=2")`` builds a descriptor from the text a user types; the same
text (with every parameter, see ``Descriptor.spec``) names its vectors inside a collection.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pkgutil
import warnings
from typing import Any

from cbir.features.base import Descriptor, DescriptorUnavailableError
from cbir.metrics import Metric, get_metric, metric_names

_REGISTRY: dict[str, type[Descriptor]] = {}
_ALIASES: dict[str, str] = {}


def register_descriptor(cls: type[Descriptor]) -> type[Descriptor]:
    """Class decorator that makes a descriptor available by its ``name`` and ``aliases``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"descriptor name {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    return cls


_INFRASTRUCTURE = {"base", "registry", "inputs"}
_loaded = False


def _ensure_builtins() -> None:
    """Import every family module of this package (running its ``@register_descriptor``
    decorators), then plug-ins other packages declare under the ``cbir.descriptors`` entry
    point group: a new descriptor is one file, with no list to edit."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import cbir.features as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _INFRASTRUCTURE and not module.name.startswith("_"):
            importlib.import_module(f"cbir.features.{module.name}")
    for entry in importlib.metadata.entry_points(group="cbir.descriptors"):
        try:
            entry.load()
        except Exception as exc:  # a broken plug-in must not take the built-ins down
            warnings.warn(f"cbir plug-in {entry.name!r} failed to load: {exc}", stacklevel=2)


def descriptor_names() -> list[str]:
    """Registered descriptor names, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def get_descriptor_class(name: str) -> type[Descriptor]:
    """The class registered under ``name`` (or an alias); a clear error if there is none."""
    _ensure_builtins()
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown descriptor {name!r}; registered descriptors: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[key]


def _format_value(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "x".join(_format_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_spec(name: str, params: dict[str, Any]) -> str:
    """``name:k=v,...`` with tuples written ``9x3x3``; the inverse of :func:`parse_spec`."""
    if not params:
        return name
    return name + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in params.items())


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``"lbp:P=16,R=2"`` into ``("lbp", {"P": "16", "R": "2"})`` (values still text)."""
    name, _, rest = spec.strip().partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(
                f"descriptor parameter {item!r} in {spec!r} is not of the form key=value"
            )
        params[key.strip()] = value.strip()
    return name.strip(), params


def _coerce(descriptor: str, key: str, text: Any, default: Any) -> Any:
    """Turn a parameter's text into the type of its default, naming what is wrong if it fails."""
    if not isinstance(text, str):
        return text
    try:
        if isinstance(default, bool):
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            parts = text.strip("()[] ").replace(",", "x").split("x")
            kind = type(default[0]) if default else int
            return tuple(kind(p) for p in parts if p)
        if default is None:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
    except ValueError:
        want = "a tuple like 8x4x4" if isinstance(default, tuple) else type(default).__name__
        raise ValueError(
            f"parameter {key!r} of descriptor {descriptor!r} must be {want}, got {text!r}"
        ) from None
    return text


def create_descriptor(spec: str | Descriptor, **params: Any) -> Descriptor:
    """Build a descriptor from ``"name"`` or ``"name:k=v,..."`` plus keyword overrides."""
    if isinstance(spec, Descriptor):
        return spec
    name, text_params = parse_spec(spec)
    cls = get_descriptor_class(name)
    defaults = cls.param_defaults()
    merged: dict[str, Any] = {**text_params, **params}
    unknown = sorted(set(merged) - set(defaults))
    if unknown:
        allowed = ", ".join(f"{k}={_format_value(v)}" for k, v in defaults.items()) or "none"
        raise ValueError(
            f"descriptor {cls.name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters (with defaults): {allowed}"
        )
    kwargs = {k: _coerce(cls.name, k, v, defaults[k]) for k, v in merged.items()}
    descriptor = cls(**kwargs)
    reason = cls.missing_requirements(descriptor.get_params())
    if reason:
        raise DescriptorUnavailableError(f"descriptor {cls.name!r} cannot run here: {reason}")
    return descriptor


def metric_applies(descriptor: str | Descriptor | type[Descriptor], metric: str | Metric) -> bool:
    """Whether a metric's input domain covers what a descriptor outputs: histogram metrics need
    non-negative vectors, bit metrics need 0/1 vectors."""
    if isinstance(descriptor, str):
        cls = get_descriptor_class(parse_spec(descriptor)[0])
    else:
        cls = descriptor if isinstance(descriptor, type) else type(descriptor)
    m = get_metric(metric)
    return not (m.binary and not cls.binary) and not (m.nonnegative and not cls.nonnegative)


def metrics_for(descriptor: str | Descriptor | type[Descriptor]) -> list[str]:
    """The registered metrics that apply to a descriptor."""
    return [m for m in metric_names() if metric_applies(descriptor, m)]


def describe_descriptors() -> list[dict[str, Any]]:
    """Name, aliases, parameters with defaults, dimension, default metric and summary of each."""
    rows = []
    for name in descriptor_names():
        cls = _REGISTRY[name]
        instance = cls()
        rows.append(
            {
                "name": name,
                "aliases": list(cls.aliases),
                "params": {k: _jsonable(v) for k, v in cls.param_defaults().items()},
                "dim": instance.dim,
                "default_metric": cls.default_metric,
                "requires_fit": bool(instance.requires_fit),
                "needs_labels": cls.needs_labels,
                "available": cls.missing_requirements(instance.get_params()) is None,
                "description": cls.summary(),
            }
        )
    return rows


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
