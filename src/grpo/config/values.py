"""The value types of settings: what pydantic checks and converts a YAML or command-line value to.

Every settings dataclass is validated by a ``pydantic.TypeAdapter`` (see :mod:`grpo.config.loading`) under
:data:`SETTINGS_CONFIG`: an unknown key is an error, and each field's docstring becomes its description.
pydantic's lax mode converts most values ("1e-4" to a float, "true" to a bool); the types here add the
conventions of grpo's settings that it does not have, each a ``BeforeValidator`` that hands pydantic a
value it reads the grpo way, or refuses with pydantic's own error:

* an integer may be written in scientific notation when it is whole ("2e3"), but never as a bool or with a
  decimal point ("12.0" is not taken for 12);
* a number is never a bool;
* a true/false setting takes true/false, 1/0, yes/no or on/off, in any case, and nothing else;
* text is kept as given (whitespace can matter: step_delimiter), and a YAML scalar that is not a string
  (``2024``, a date) is its text;
* an optional setting (:data:`Maybe`) is None for "none" or "null" (in any case);
* a list may be given as comma-separated text ("accuracy,format"), as on the command line;
* a reward function is a name or a mapping with a 'name'.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, ConfigDict
from pydantic_core import PydanticCustomError, PydanticKnownError

# Read each field's docstring (the string right under it) as its description; refuse unknown keys.
SETTINGS_CONFIG = ConfigDict(use_attribute_docstrings=True, extra="forbid")


@dataclasses.dataclass
class Settings:
    """The root of every settings dataclass: carries the pydantic config that reads it."""

    __pydantic_config__ = SETTINGS_CONFIG


BOOLEAN_WORDS = frozenset({"true", "false", "1", "0", "yes", "no", "on", "off"})
NONE_WORDS = frozenset({"none", "null"})


def _integer(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticKnownError("int_type")
    if isinstance(value, str):
        text = value.strip()
        if "e" in text.lower():  # 2e3: a whole number in scientific notation
            try:
                number = float(text)
            except ValueError:
                return value  # pydantic names the failure
            return int(number) if number.is_integer() else value
        if "." in text:
            raise PydanticKnownError("int_parsing")
    return value


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticKnownError("float_type")
    return value


def _boolean(value: Any) -> Any:
    if isinstance(value, str):
        if value.strip().lower() not in BOOLEAN_WORDS:
            raise PydanticKnownError("bool_parsing")
        return value.strip()
    if isinstance(value, float):
        raise PydanticKnownError("bool_type")
    return value


def _text(value: Any) -> Any:
    if value is None or isinstance(value, (str, list, dict)):
        return value
    return str(value)


def _none_word(value: Any) -> Any:
    return None if isinstance(value, str) and value.lower() in NONE_WORDS else value


def _comma_list(value: Any) -> Any:
    if value is None or isinstance(value, list):
        return value
    return [item.strip() for item in str(value).split(",") if item.strip()]


def _reward_entry(value: Any) -> Any:
    # The messages follow the field's name: "reward_funcs: a mapping needs ...".
    if isinstance(value, dict):
        if not isinstance(value.get("name"), str) or not value["name"].strip():
            raise PydanticCustomError(
                "reward_entry",
                ": a mapping needs a 'name' (the reward's kind), got {entry}",
                {"entry": repr(value)},
            )
        return {str(key): item for key, item in value.items()}
    if isinstance(value, (list, bool)) or value is None:
        raise PydanticCustomError(
            "reward_entry", " must be names or mappings, got {entry}", {"entry": repr(value)}
        )
    return str(value).strip()


Integer = Annotated[int, BeforeValidator(_integer)]
Number = Annotated[float, BeforeValidator(_number)]
Boolean = Annotated[bool, BeforeValidator(_boolean)]
Text = Annotated[str, BeforeValidator(_text)]
NumberList = Annotated[list[Number], BeforeValidator(_comma_list)]
TextList = Annotated[list[Text], BeforeValidator(_comma_list)]
RewardEntry = Annotated[str | dict[str, Any], BeforeValidator(_reward_entry)]
RewardList = Annotated[list[RewardEntry], BeforeValidator(_comma_list)]

T = TypeVar("T")
Maybe = Annotated[T | None, BeforeValidator(_none_word)]
"""An optional setting: ``Maybe[Text]`` is text or None, and takes "none" or "null" for None."""

# How an error of pydantic's names the type it expected, by the first word of the error's type
# ("int_parsing", "float_type", ...); in a list, the plural.
TYPE_WORDS = {
    "int": ("an integer", "integers"),
    "float": ("a number", "numbers"),
    "bool": ("true or false", "true/false values"),
    "string": ("a string", "strings"),
}
