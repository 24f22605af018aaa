"""Typed, validated run configs: YAML presets in `configs/` plus `--set a.b=c` overrides.

Each config class sits beside the code that reads it; this module only composes and loads them. Every class
forbids unknown keys and is strict about types (an int is accepted where a float is expected), so any mistake
fails at start-up with the dotted field path, e.g. `optim.lr: Input should be a valid number (got 'fast')`.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from common.paths import CONFIG_DIR, resolve_shipped


class ConfigError(ValueError):
    """Bad user configuration; the CLI prints it and exits with code 2."""


class Section(BaseModel):
    """Base of every config section: frozen, strict, no unknown keys."""

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, validate_default=True, use_attribute_docstrings=True
    )


C = TypeVar("C", bound=BaseModel)

# A path field whose relative default (the shipped checkpoint, the regress baseline) works from any directory.
ShippedPath = Annotated[str, AfterValidator(resolve_shipped)]


_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def yaml_numbers(x: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; every ML user writes it that way, so read it as the float."""
    if isinstance(x, str) and _SCI.match(x.strip()):
        return float(x)
    if isinstance(x, dict):
        return {k: yaml_numbers(v) for k, v in x.items()}
    if isinstance(x, list):
        return [yaml_numbers(v) for v in x]
    return x


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], yaml value of c)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=0.001")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml_numbers(yaml.safe_load(raw)) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({e})") from None
    return path, value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def format_validation_error(err: ValidationError, source: str, cls: type[BaseModel] | None = None) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
            near = _closest_field(cls, e["loc"]) if cls is not None else None
            if near:
                msg += f" (did you mean {near}?)"
        lines.append(f"  {loc}: {msg}{got}")
    return "\n".join(lines)


def _closest_field(cls: type[BaseModel], loc: tuple) -> str | None:
    """The valid name closest to the unknown key at `loc` (the section's own fields), as a dotted path, or None."""
    model: Any = cls
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections: same model
            continue
        field = (
            model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        )
        if field is None:
            return None
        model = _section_type(field.annotation)
        if model is None:
            return None
    names = list(model.model_fields)
    near = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return ".".join([*(str(p) for p in loc[:-1]), near[0]]) if near else None


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds (itself, or inside a list / Optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def describe_fields(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, docstring) of every field, nested sections flattened after a row of their own
    (`name.*`, no type) (`blockrl CMD --help`)."""
    rows = []
    for name, field in cls.model_fields.items():
        path = f"{prefix}{name}"
        section = field.annotation if isinstance(field.annotation, type) else None
        if section is not None and issubclass(section, BaseModel):
            rows.append((f"{path}.*", "", "", " ".join((field.description or "").split())))
            rows += describe_fields(section, f"{path}.")
            continue
        if field.default_factory is not None:
            default = repr(field.default_factory())
        else:
            default = "required" if field.is_required() else repr(field.default)
        if len(default) > 60:
            default = default[:57] + "..."
        rows.append(
            (path, _type_name(field.annotation), default, " ".join((field.description or "").split()))
        )
    return rows


def _type_name(ann: Any) -> str:
    """A field's type as a user writes it: `int`, `list[str]`, `a | b` for a Literal's choices, `str | None`."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if ann is type(None) else getattr(ann, "__name__", str(ann))


def format_fields(cls: type[BaseModel], width: int = 100) -> str:
    """The fields of a config as help text: `name: type = default` and its docstring, wrapped to `width`."""
    import textwrap

    out = [f"config fields ({cls.__name__}; set any with --set NAME=VALUE):"]
    for name, kind, default, doc in describe_fields(cls):
        out.append(f"  {name}: {kind} = {default}" if kind else f"  {name}")  # a section: its fields follow
        if doc:
            out += textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(out)


def resolve_config_path(name: str | Path) -> Path:
    """A file path, or the name of a preset in configs/ (with or without .yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    presets = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config file {str(name)!r} not found (presets: {', '.join(presets)})")


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] = ()) -> C:
    """Load YAML (optional), apply overrides, validate into `cls`. Raises ConfigError naming the field."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = resolve_config_path(path)
        source = str(p)
        try:
            data = yaml_numbers(yaml.safe_load(p.read_text()) or {})
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, *parse_override(item))
    if overrides:
        source += " + --set " + " ".join(overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, cls)) from None


def dump_config(cfg: BaseModel, path: Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
