"""Reading settings: defaults, then a YAML file, then command-line flags, each layer checked by pydantic.

A run's config comes from the defaults, then a YAML file (``--config FILE``), then command-line flags;
:func:`load_config` (`grpo train`) and :func:`load_settings` (the other stages) merge them and validate the
result before anything heavy is loaded. Each layer is checked and converted on its own by a
``pydantic.TypeAdapter`` over the settings dataclass (:func:`convert`: the value types of
:mod:`grpo.config.values` say how a value is read), so that an unknown key or a bad value is one line
naming where it came from: ``run.yaml: unknown setting 'x'; did you mean 'y'?``, ``command line:
learning_rate must be a number, got 'abc'``. The same pydantic schema reads each field's docstring
(:func:`field_docs`) for `--help`. Settings leave the process (a run's files, a message) only through
:func:`without_secrets` and :func:`scrub_secrets`, so that a reward's key is never written or printed.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from grpo.config.grpo import ALIASES, GRPOConfig
from grpo.config.stages import STAGE_ALIASES
from grpo.config.tasks import TASK_SETTINGS
from grpo.config.values import TYPE_WORDS
from grpo.errors import ConfigError


@cache
def adapter(cls: type) -> TypeAdapter[Any]:
    """pydantic's validator of the settings dataclass ``cls`` (its config: grpo.config.values.Settings)."""
    return TypeAdapter(cls)


@cache
def _properties(cls: type) -> dict[str, dict[str, Any]]:
    return adapter(cls).json_schema()["properties"]


@cache
def field_docs(cls: type = GRPOConfig) -> dict[str, str]:
    """Each field's docstring (the string right under it), on one line, as pydantic reads it: the one place
    they are written, for `--help` and the docs. pydantic reads a stdlib dataclass's own source only, so
    each class that declares fields (a group of grpo.config.groups, then the stage) gives its own; a stage
    that re-declares a group's field has the last word."""
    docs = {}
    for base in reversed(cls.__mro__):
        own = inspect.get_annotations(base)
        if dataclasses.is_dataclass(base) and own:
            for name, schema in _properties(base).items():
                if name in own and "description" in schema:
                    docs[name] = " ".join(schema["description"].split())
    return docs


def switches(cls: type) -> frozenset[str]:
    """The true/false fields of ``cls`` (a ``--name/--no-name`` flag each on the command line)."""
    return frozenset(name for name, schema in _properties(cls).items() if schema.get("type") == "boolean")


def convert(
    cls: type, layer: dict[Any, Any], source: str, aliases: dict[str, str] | None = None
) -> dict[str, Any]:
    """The settings of one layer (a YAML file, the flags, a checkpoint's settings), each converted to its
    field's type by pydantic. Keys may use dashes or an alias. The first key (in the layer's order) that is
    not a field, or whose value its type refuses, is a ConfigError naming ``source``."""
    aliases = aliases or {}
    given: dict[str, Any] = {}
    written: dict[str, str] = {}  # each field's key as the layer spells it
    for key, value in layer.items():
        name = str(key).replace("-", "_")
        name = aliases.get(name, name)
        given[name] = value
        written[name] = str(key)
    try:
        checked = adapter(cls).validate_python(given)
    except ValidationError as error:
        place = {name: i for i, name in enumerate(given)}
        first = min(error.errors(), key=lambda e: place.get(e["loc"][0], -1) if e["loc"] else -1)
        message = str(_config_error(first, given, written, source, cls, aliases))
        raise ConfigError(scrub_secrets(message, given)) from None  # (the value quoted may hold a key)
    return {name: getattr(checked, name) for name in given}


def _config_error(
    error: ErrorDetails,
    given: dict[str, Any],
    written: dict[str, str],
    source: str,
    cls: type,
    aliases: dict[str, str],
) -> ConfigError:
    """pydantic's ``error`` as one line: the setting, the type it wants and the value it got."""
    name = str(error["loc"][0]) if error["loc"] else ""
    if name not in given:  # (not a setting's error: none is expected)
        return ConfigError(f"{source}: {error['msg']}")
    if error["type"] == "unexpected_keyword_argument":
        return unknown_key_error(written[name], source, cls, aliases)
    value = given[name]
    if value is None:
        return ConfigError(f"{source}: {name} must not be empty")
    if error["type"] == "reward_entry":  # (its message goes on from the field's name)
        return ConfigError(f"{source}: {name}{error['msg']}")
    words = TYPE_WORDS.get(error["type"].split("_")[0])
    if words is None:
        return ConfigError(f"{source}: {name}: {error['msg']}, got {value!r}")
    expected = f"a list of {words[1]}" if len(error["loc"]) > 1 else words[0]
    return ConfigError(f"{source}: {name} must be {expected}, got {value!r}")


def unknown_key_error(
    key: str, source: str, cls: type = GRPOConfig, aliases: dict[str, str] = ALIASES
) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)] + list(aliases)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{source}: unknown setting {key!r}{hint}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML settings file holds; a file that is missing, unreadable, not YAML or not a
    mapping is a ConfigError naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: config file not found: it is a directory")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of setting: value")
    return data


def merge_layers(
    cls: type,
    config_file: str | Path | None,
    overrides: dict[str, Any] | None,
    aliases: dict[str, str],
    source: str = "command line",
) -> dict[str, Any]:
    """The values set by the YAML file, then by ``overrides`` (keys may use dashes or an alias), each
    converted to its field's type; an unknown key or a bad value names itself and where it came from."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(convert(cls, read_yaml(config_file), str(config_file), aliases))
    values.update(convert(cls, overrides or {}, source, aliases))
    return values


SettingsT = typing.TypeVar("SettingsT")


def load_settings(
    cls: type[SettingsT],
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    aliases: dict[str, str] = STAGE_ALIASES,
    source: str = "command line",
) -> SettingsT:
    """A stage's settings dataclass: defaults, then the YAML file, then ``overrides`` (their errors name
    ``source``); validated."""
    config = cls(**merge_layers(cls, config_file, overrides, aliases, source))
    validate_from(config, source)
    return config


def validate_from(config: Any, source: str) -> None:
    """``config.validate()``, its error naming ``source`` when the values came from a file's section."""
    try:
        config.validate()
    except ConfigError as error:
        message = scrub_secrets(str(error), dataclasses.asdict(config))  # (it may quote a reward entry)
        if source != "command line" and not message.startswith(source):
            message = f"{source}: {message}"
        raise ConfigError(message) from None


def load_config(
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    source: str = "command line",
    base: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> GRPOConfig:
    """Defaults, then the YAML file, then ``overrides`` (their errors name ``source``); validated.
    ``base``, given the values that the file and ``overrides`` set, returns settings to put under them: a run
    that resumes takes its checkpoint's settings as that base (grpo.runs.resume.resumed_base)."""
    values = merge_layers(GRPOConfig, config_file, overrides, ALIASES, source)
    if base is not None:
        values = {**base(values), **values}
    dataset = values.get("dataset", field_defaults(GRPOConfig)["dataset"])
    values = {**convert(GRPOConfig, TASK_SETTINGS.get(dataset, {}), f"task {dataset}", ALIASES), **values}
    config = GRPOConfig(**values)
    validate_from(config, source)
    return config


# Reward options that hold secrets: never written into a file or printed. Each has a twin named
# "<option>_env" that names the environment variable holding the secret, so that no file needs it.
SECRET_OPTIONS = ("api_key",)
SECRET_SHOWN_AS = "***"


def without_secrets(data: Any) -> Any:
    """``data`` (settings, reward entries: any nest of mappings and lists) with every secret option
    (SECRET_OPTIONS) left out of every mapping, at any depth: what may be written into a file or printed.
    The one way settings leave the process."""
    if isinstance(data, Mapping):
        return {key: without_secrets(value) for key, value in data.items() if key not in SECRET_OPTIONS}
    if isinstance(data, list | tuple):
        return [without_secrets(value) for value in data]
    return data


def secrets_in(data: Any) -> list[str]:
    """The values of the secret options anywhere in ``data`` (a nest of mappings and lists), longest first."""
    found: set[str] = set()

    def visit(value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                if key in SECRET_OPTIONS and isinstance(item, str) and item:
                    found.add(item)
                else:
                    visit(item)
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item)

    visit(data)
    return sorted(found, key=len, reverse=True)  # (a key that contains another is replaced whole)


def scrub_secrets(text: str, data: Any) -> str:
    """``text`` (an error message, a log line) with every secret that ``data`` holds shown as ***: for
    messages that quote a value which may carry one."""
    for secret in secrets_in(data):
        text = text.replace(secret, SECRET_SHOWN_AS)
    return text


def field_defaults(cls: type) -> dict[str, Any]:
    """Each field's default: what a record written before the field existed ran with."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def to_dict(config: Any) -> dict[str, Any]:
    """A settings dataclass (GRPOConfig or a stage's) as plain data for a run's files, without secrets
    (:func:`without_secrets`)."""
    return without_secrets(dataclasses.asdict(config))


def secrets_by_environment(entries: list[Any], source: str) -> tuple[list[Any], dict[str, str]]:
    """The reward entries with each secret option given in the file (a judge's api_key) replaced by its
    ``<option>_env`` twin naming an environment variable, and those variables' values. Each run is a
    process of its own that reads its settings from a file: it gets the secrets in its environment, and no
    file holds them. The names follow the entry's place, so that a run's settings stay the same. An entry
    that gives both an option and its twin is a ConfigError naming ``source``."""
    replaced, environment = [], {}
    for number, entry in enumerate(entries, start=1):
        if isinstance(entry, dict):
            entry = dict(entry)
            for option in SECRET_OPTIONS:
                if entry.get(option) is not None and f"{option}_env" in entry:
                    raise ConfigError(
                        f"{source}: reward_funcs entry {number}: give {option} or {option}_env, not both"
                    )
                if entry.get(option) is not None:
                    variable = f"GRPO_REWARD_{number}_{option.upper()}"
                    environment[variable] = str(entry.pop(option))
                    entry[f"{option}_env"] = variable
        replaced.append(entry)
    return replaced, environment
