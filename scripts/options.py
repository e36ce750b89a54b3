"""Config values as users type them: ``python -m monai.bundle run ... --resume false`` hands the text "false" to the
config (Python Fire reads only ``False`` as a boolean), and the text "false" is true in Python. Boolean keys read
through ``flag``, so both spellings mean what they say and anything else is refused with the key named.

>>> flag("false", "resume"), flag(True, "resume"), flag("Yes", "amp")
(False, True, True)
"""

from __future__ import annotations

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
