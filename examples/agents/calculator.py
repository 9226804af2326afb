"""Tools for `grpo train --tools examples/agents/calculator.py:multiply,...`: plain functions with a type hint on
every argument and a Google-style docstring (transformers' get_json_schema turns each into the JSON schema
the model is shown). A tool returns a string; what it raises is what the model reads back, as an error."""


def multiply(a: int, b: int) -> str:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return str(a * b)


def divide(a: float, b: float) -> str:
    """Divide one number by another.

    Args:
        a: The dividend.
        b: The divisor, not zero.
    """
    return str(a / b)  # b = 0 raises: the model reads "error: ZeroDivisionError: division by zero"
