"""Config settings, each declared once as metadata on a dataclass field.

A frozen dataclass *is* the table of its owner's settings. Every field is
declared with one of the helpers below (:func:`integer`, :func:`number`,
:func:`flag`, :func:`text`, :func:`choice`, :func:`integers`, :func:`path`),
which record the key, type, default, bounds or choices, a one-line doc and
whether and under which name the value travels in the round config
(``wire``). From that one declaration this module derives:

* parsing and validation (:func:`parse`, :func:`check`), with errors that name
  the key, where it came from and how to fix it;
* the dataclass default (the helper's return value is the field default);
* the list of known keys (:func:`keys`), so a misspelt key is refused;
* the round-config writer (:func:`to_wire`) and reader (``parse(..., by="wire")``);
* the README's table of keys (:func:`markdown_table`) and the defaults
  ``flwr run`` reads from ``pyproject.toml`` (:func:`toml_defaults`), both
  checked against this declaration by the test suite.

Nested settings objects (a run config's model) are declared with
:func:`section`; their keys are part of the owner's flat namespace.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from shared.errors import ConfigError

Kind = Literal["int", "float", "bool", "str", "choice", "ints", "path"]
By = Literal["key", "wire"]

_SETTING = "fedseg-setting"
_SECTION = "fedseg-section"


@dataclass(frozen=True)
class Source:
    """Where a config value comes from, and what its owner does to change it."""

    name: str
    fix: str


RUN_CONFIG = Source(
    "run config", "set it in [tool.flwr.app.config] of pyproject.toml or with --run-config")
ROUND_CONFIG = Source(
    "round config from the server", "the server and the site must run the same fedseg version")
NODE_CONFIG = Source(
    "node config", "set it with flower-supernode --node-config or the site's config file")


class Choices(Protocol):
    """The allowed values of a choice setting: a :class:`shared.registry.Registry`."""

    def names(self) -> tuple[str, ...]:
        """Return the allowed values, in the order users see them."""

    def problem(self, name: str) -> str:
        """Return why ``name`` is refused, suggesting the closest allowed value."""


@dataclass(frozen=True)
class Setting:
    """The declaration of one config key.

    Attributes
    ----------
    key : str or None
        The key in its owner's config (run config or node config); ``None`` for a
        value that only exists in the round config.
    kind : str
        How a raw value is parsed: int, float, bool, str, choice, ints, path.
    default : object
        The value when the key is absent (and the dataclass default).
    doc : str
        One line for the README's table of keys.
    wire : str or None
        The key under which the value travels in the round config; ``None``: it
        stays with its owner.
    wire_required : bool
        A round config without ``wire`` is an error (the model architecture).
    required : bool
        Its owner's config must set ``key``.
    minimum, maximum : float or None
        Bounds (inclusive unless ``exclusive_*``).
    choices : Choices or None
        The registry whose names are the allowed values.
    rule : callable or None
        An extra single-value check returning a problem, or ``None`` when valid.
    lower : bool
        Strip and lower-case a string value while parsing.
    shown_default : str or None
        How the README shows the default, when not the value itself.
    planned : bool
        The federated planner (:mod:`shared.planning`) sets it when the run config
        says ``auto``, which is then its default in ``pyproject.toml``.
    empty_ok : bool
        A list setting may be ``none`` (the empty tuple).
    """

    key: str | None
    kind: Kind
    default: Any
    doc: str
    wire: str | None = None
    wire_required: bool = False
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: Choices | None = None
    rule: Callable[[Any], str | None] | None = None
    lower: bool = False
    shown_default: str | None = None
    planned: bool = False
    empty_ok: bool = False

    def name(self, by: By) -> str:
        """Return the key this setting has in the config read ``by`` key or wire name."""
        first, second = (self.key, self.wire) if by == "key" else (self.wire, self.key)
        return first or second or "?"


class SettingError(ConfigError):
    """A value that breaks its declaration; re-attributed to the config it was read from."""

    def __init__(self, owner: type, attr: str, problem: str, source: Source,
                 by: By = "key") -> None:
        self.owner = owner
        self.attr = attr
        self.problem = problem
        super().__init__(source.name, declaration(owner, attr).name(by), problem, source.fix)


def _declare(setting: Setting) -> Any:
    if setting.required:
        return dataclasses.field(metadata={_SETTING: setting})
    return dataclasses.field(default=setting.default, metadata={_SETTING: setting})


def integer(key: str | None, default: int, doc: str, *, minimum: int | None = None,
            wire: str | None = None, wire_required: bool = False,
            shown_default: str | None = None, planned: bool = False) -> int:
    """Declare an integer setting."""
    return cast(int, _declare(Setting(key, "int", default, doc, wire, wire_required,
                                      minimum=minimum, shown_default=shown_default,
                                      planned=planned)))


def number(key: str | None, default: float, doc: str, *, minimum: float | None = None,
           maximum: float | None = None, exclusive_minimum: bool = False,
           exclusive_maximum: bool = False, wire: str | None = None,
           shown_default: str | None = None, planned: bool = False) -> float:
    """Declare a finite floating-point setting."""
    return cast(float, _declare(Setting(
        key, "float", default, doc, wire, minimum=minimum, maximum=maximum,
        exclusive_minimum=exclusive_minimum, exclusive_maximum=exclusive_maximum,
        shown_default=shown_default, planned=planned)))


def flag(key: str | None, default: bool, doc: str, *, wire: str | None = None) -> bool:
    """Declare a true/false setting."""
    return cast(bool, _declare(Setting(key, "bool", default, doc, wire)))


def text(key: str | None, default: str, doc: str, *, rule: Callable[[str], str | None] | None
         = None, lower: bool = False, shown_default: str | None = None) -> str:
    """Declare a free-text setting, optionally checked by ``rule``."""
    return cast(str, _declare(Setting(key, "str", default, doc, rule=rule, lower=lower,
                                      shown_default=shown_default)))


def choice(key: str | None, default: str, doc: str, *, choices: Choices,
           wire: str | None = None, wire_required: bool = False,
           planned: bool = False) -> str:
    """Declare a setting whose value is one name of a registry."""
    return cast(str, _declare(Setting(key, "choice", default, doc, wire, wire_required,
                                      choices=choices, lower=True, planned=planned)))


def integers(key: str | None, default: tuple[int, ...], doc: str, *, minimum: int = 1,
             wire: str | None = None, wire_required: bool = False, planned: bool = False,
             empty_ok: bool = False) -> tuple[int, ...]:
    """Declare a comma-separated list of integers (``"16,32,64"``; ``none`` if ``empty_ok``)."""
    return cast(tuple[int, ...], _declare(Setting(key, "ints", default, doc, wire,
                                                  wire_required, minimum=minimum,
                                                  planned=planned, empty_ok=empty_ok)))


def path(key: str, default: Path, doc: str, *, required: bool = False,
         shown_default: str | None = None) -> Path:
    """Declare a file-system path (``~`` is expanded)."""
    return cast(Path, _declare(Setting(key, "path", default, doc, required=required,
                                       shown_default=shown_default)))


def section(cls: type[Any]) -> Any:
    """Declare a nested settings object whose keys join its owner's namespace."""
    return dataclasses.field(default_factory=cls, metadata={_SECTION: cls})


def declaration(owner: type, attr: str) -> Setting:
    """Return the :class:`Setting` of ``owner.attr``."""
    for f in dataclasses.fields(owner):
        if f.name == attr:
            return cast(Setting, f.metadata[_SETTING])
    raise AttributeError(f"{owner.__name__} has no setting {attr!r}")


def own_settings(owner: type) -> Iterator[tuple[str, Setting]]:
    """Yield ``(attribute, Setting)`` for the settings declared directly on ``owner``."""
    for f in dataclasses.fields(owner):
        if _SETTING in f.metadata:
            yield f.name, f.metadata[_SETTING]


def sections(owner: type) -> Iterator[tuple[str, type]]:
    """Yield ``(attribute, class)`` for the nested settings objects of ``owner``."""
    for f in dataclasses.fields(owner):
        if _SECTION in f.metadata:
            yield f.name, f.metadata[_SECTION]


def all_settings(owner: type) -> Iterator[tuple[type, str, Setting]]:
    """Yield ``(class, attribute, Setting)`` for ``owner`` and its sections, in field order."""
    for f in dataclasses.fields(owner):
        if _SETTING in f.metadata:
            yield owner, f.name, f.metadata[_SETTING]
        elif _SECTION in f.metadata:
            yield from all_settings(f.metadata[_SECTION])


def keys(owner: type) -> frozenset[str]:
    """Return every key of ``owner``'s config (sections included)."""
    return frozenset(s.key for _, _, s in all_settings(owner) if s.key)


def refuse_unknown(values: Mapping[str, Any], known: frozenset[str], source: Source,
                   what: str, also_allowed: frozenset[str] = frozenset()) -> None:
    """Raise :class:`ConfigError` naming the first key of ``values`` that is not ``known``."""
    unknown = sorted(set(values) - known - also_allowed)
    if unknown:
        raise ConfigError(source.name, unknown[0], f"is not a fedseg {what}",
                          f"remove it or use one of: {', '.join(sorted(known))}")


#: The value of a planned key that asks the federated planner to choose it.
AUTO = "auto"


def planned_keys(owner: type) -> frozenset[str]:
    """Return the keys of ``owner``'s config that the planner may set."""
    return frozenset(s.key for _, _, s in all_settings(owner) if s.key and s.planned)


def unplanned(owner: type, values: Mapping[str, Any]) -> frozenset[str]:
    """Return the planned keys of ``owner`` that ``values`` leaves to the planner."""
    return frozenset(k for k in planned_keys(owner)
                     if isinstance(values.get(k, AUTO), str)
                     and str(values.get(k, AUTO)).strip().lower() == AUTO)


def resolve_planned(owner: type, values: Mapping[str, Any],
                    plan: Mapping[str, Any] | None) -> dict[str, Any]:
    """Replace every ``auto`` (or absent) planned key by the plan's value or its default.

    A value the run config sets explicitly always wins over the plan.
    """
    out = dict(values)
    left = unplanned(owner, values)
    for _, _, s in all_settings(owner):
        if s.key is None or s.key not in left:
            continue
        if plan is not None and s.key in plan:
            out[s.key] = plan[s.key]
        else:
            out[s.key] = _encode(s.default) if s.kind == "ints" else s.default
    return out


# --- parsing: raw config value -> typed value -------------------------------------------

def _convert(s: Setting, raw: Any) -> Any:
    """Return ``raw`` as the setting's type, or raise ``ValueError`` with the problem."""
    if s.kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ValueError(f"expected an integer, got {raw!r}")
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
        if isinstance(raw, float) and raw != value:
            raise ValueError(f"expected an integer, got {raw!r}")
        return value
    if s.kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ValueError(f"expected a number, got {raw!r}")
        try:
            number_ = float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
        if not math.isfinite(number_):
            raise ValueError(f"must be a finite number, got {raw!r}")
        return number_
    if s.kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
            return raw.lower() in ("true", "1", "yes")
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        raise ValueError(f"expected true or false, got {raw!r}")
    if s.kind == "ints":
        if isinstance(raw, int) and not isinstance(raw, bool):
            parts = [str(raw)]
        elif isinstance(raw, str):
            if s.empty_ok and raw.strip().lower() in ("", "none"):
                return ()
            parts = [p for p in re.split(r"[,\sx]+", raw.strip()) if p]
        else:
            raise ValueError(f"expected comma-separated integers, got {raw!r}")
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"expected comma-separated integers, got {raw!r}") from None
        if not values:
            raise ValueError("must list at least one integer")
        return values
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {raw!r}")
    if s.kind == "path":
        return Path(raw).expanduser()
    return raw.strip().lower() if s.lower else raw


def parse(owner: type[Any], values: Mapping[str, Any], source: Source, by: By = "key") -> Any:
    """Build an ``owner`` from a flat config mapping, validating every value once.

    Parameters
    ----------
    owner : type
        A settings dataclass (its fields declared with this module's helpers).
    values : Mapping
        The flat config: a run config, a node config or a round config.
    source : Source
        Named in every error, with its fix.
    by : {"key", "wire"}
        Read each setting under its config key or its round-config (wire) name.

    Raises
    ------
    ConfigError
        A value is missing, of the wrong type or breaks its declaration; the
        message names the key as ``values`` spells it and ``source``.
    """
    kwargs: dict[str, Any] = {}
    for attr, s in own_settings(owner):
        name = s.key if by == "key" else s.wire
        if name is None:
            continue
        if name not in values:
            if s.required or (by == "wire" and s.wire_required):
                raise ConfigError(source.name, name, "is required but missing", source.fix)
            continue
        try:
            kwargs[attr] = _convert(s, values[name])
        except ValueError as exc:
            raise ConfigError(source.name, name, str(exc), source.fix) from None
    for attr, cls in sections(owner):
        kwargs[attr] = parse(cls, values, source, by)
    try:
        return owner(**kwargs)
    except SettingError as exc:
        raise SettingError(exc.owner, exc.attr, exc.problem, source, by) from None


# --- validation: typed value -> problem ---------------------------------------------------

def _problem(s: Setting, value: Any) -> str | None:
    if s.choices is not None:
        return None if value in s.choices.names() else s.choices.problem(value)
    if s.kind == "ints":
        if not value and not s.empty_ok:
            return "must list at least one integer"
        if s.minimum is not None and any(v < s.minimum for v in value):
            return (f"every value must be at least {s.minimum:g}, got "
                    f"{','.join(str(v) for v in value)!r}")
    elif s.kind in ("int", "float") and not isinstance(value, bool):
        low, high = s.minimum, s.maximum
        if low is not None and (value < low or (s.exclusive_minimum and value == low)):
            bound = "greater than" if s.exclusive_minimum else "at least"
            return f"must be {bound} {_show(low, s.kind)}, got {value}"
        if high is not None and (value > high or (s.exclusive_maximum and value == high)):
            bound = "less than" if s.exclusive_maximum else "at most"
            return f"must be {bound} {_show(high, s.kind)}, got {value}"
    return s.rule(value) if s.rule is not None else None


def _show(bound: float, kind: str) -> str:
    return str(int(bound)) if kind == "int" else str(float(bound))


def check(obj: Any) -> None:
    """Validate every setting declared directly on ``obj`` against its declaration.

    Called from each settings dataclass's ``__post_init__``, so a value is checked
    the same way whether it was parsed or constructed in code.
    """
    for attr, s in own_settings(type(obj)):
        problem = _problem(s, getattr(obj, attr))
        if problem is not None:
            raise invalid(obj, attr, problem)


def invalid(obj: Any, attr: str, problem: str) -> SettingError:
    """Return the error for ``obj.attr``; :func:`parse` re-attributes it to its source."""
    owner = type(obj)
    return SettingError(owner, attr, problem, getattr(owner, "SOURCE", RUN_CONFIG))


# --- writing: typed value -> config value ------------------------------------------------

def _encode(value: Any) -> Any:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) if value else "none"
    if isinstance(value, Path):
        return str(value)
    return value


def to_wire(obj: Any) -> dict[str, Any]:
    """Return the round-config entries of ``obj``: every setting with a wire name."""
    return {s.wire: _encode(getattr(obj, attr))
            for attr, s in own_settings(type(obj)) if s.wire is not None}


def to_keys(obj: Any) -> dict[str, Any]:
    """Return ``obj`` as its owner's flat config (sections included), JSON-friendly."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if _SETTING in f.metadata and f.metadata[_SETTING].key:
            out[f.metadata[_SETTING].key] = _encode(getattr(obj, f.name))
        elif _SECTION in f.metadata:
            out.update(to_keys(getattr(obj, f.name)))
    return out


def toml_defaults(owner: type) -> dict[str, Any]:
    """Return every key's default as ``pyproject.toml``'s config table holds it."""
    return {s.key: AUTO if s.planned else _encode(s.default) for _, _, s in all_settings(owner)
            if s.key and not s.required}


def markdown_table(owner: type) -> str:
    """Return the README's table of ``owner``'s keys: key, default, meaning."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for _, _, s in all_settings(owner):
        if not s.key:
            continue
        if s.planned:
            default = f"`{AUTO}` (planned; else `{_encode(s.default)}`)"
        elif s.shown_default is not None:
            default = s.shown_default
        elif s.required:
            default = "required"
        elif isinstance(s.default, bool):
            default = str(s.default).lower()
        elif isinstance(s.default, str | tuple | Path):
            shown = _encode(s.default)
            default = f"`{shown}`" if shown else '`""`'
        else:
            default = f"{s.default:g}" if isinstance(s.default, float) else str(s.default)
        doc = s.doc
        if s.choices is not None:
            doc += ": " + ", ".join(f"`{n}`" for n in s.choices.names())
        rows.append(f"| `{s.key}` | {default} | {doc} |")
    return "\n".join(rows) + "\n"
