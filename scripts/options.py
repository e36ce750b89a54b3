"""Config values as users type them: ``python -m monai.bundle run ... --resume false`` hands the text "false" to the
config (Python Fire reads only ``False`` as a boolean), and the text "false" is true in Python. Boolean keys read
through ``flag``, so both spellings mean what they say and anything else is refused with the key named. Likewise
``--early_stop_patience null`` hands over the text "null": optional counts read through ``optional_count``, optional
positive numbers (``grad_clip_norm``) through ``optional_positive``. The
scripts that build from the configs outside ``monai.bundle run`` read them through ``config_parser``, as it does.

>>> flag("false", "resume"), flag(True, "resume"), flag("Yes", "amp")
(False, True, True)
>>> optional_count("null", "early_stop_patience"), optional_count("5", "early_stop_patience")
(None, 5)
>>> optional_positive("null", "grad_clip_norm"), optional_positive("1.5", "grad_clip_norm")
(None, 1.5)
"""

from __future__ import annotations

import math

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}.")


NULL_WORDS = ("null", "none", "")


def optional_count(value, name: str) -> int | None:
    """A count of 0 or more, or None (also typed as null or None)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in NULL_WORDS):
        return None
    try:
        count = int(value)
        whole = count >= 0 and count == float(value)
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise ValueError(f"{name} must be a whole number of 0 or more, or null, got {value!r}.")
    return count


def config_parser(configs: list[str], overrides: dict):
    """MONAI's parser of the bundle's config files, in order, with the overrides on top."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(configs)
    parser.update(overrides)
    return parser


def optional_positive(value, name: str) -> float | None:
    """A finite number above 0, or None (also typed as null or None): a negative gradient-clipping norm would
    reverse the gradient instead of bounding it."""
    if value is None or (isinstance(value, str) and value.strip().lower() in NULL_WORDS):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a number above 0, or null, got {value!r}.")
    return number
