"""JSON from outside (request bodies, the reconfiguration API, standby messages), decoded with one-line errors.

``json.loads`` raises more than ``JSONDecodeError`` on hostile input: ``RecursionError`` for deep nesting,
``ValueError`` for integers longer than ``sys.get_int_max_str_digits()``, ``UnicodeDecodeError`` for bytes that
are not UTF-8. :func:`loads` turns each into :class:`MalformedJSON` with a short reason.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Union

__all__ = ["MalformedJSON", "loads"]


class MalformedJSON(ValueError):
    """The text is not acceptable JSON; the message is one line."""


def loads(data: Union[str, bytes, bytearray]) -> Any:
    """``json.loads(data)``, raising only :class:`MalformedJSON` for bad input."""
    try:
        return json.loads(data)
    except RecursionError:
        raise MalformedJSON("nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise MalformedJSON(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except UnicodeDecodeError:
        raise MalformedJSON("not UTF-8 text") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            raise MalformedJSON(f"an integer has more than {sys.get_int_max_str_digits()} digits") from None
        raise MalformedJSON(str(exc).splitlines()[0] if str(exc) else "invalid value") from None
