#!/usr/bin/env python
"""Fail when a JSON file is not formatted as the model-zoo's pre-commit hook wants: 4-space indent, keys in
their original order, a final newline. Run: python tests/check_json_format.py configs"""

import json
import sys
from pathlib import Path


def badly_formatted(root: str) -> list[str]:
    bad = []
    for path in sorted(Path(root).rglob("*.json")):
        text = path.read_text()
        if text != json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n":
            bad.append(str(path))
    return bad


if __name__ == "__main__":
    files = [f for root in sys.argv[1:] or ["configs"] for f in badly_formatted(root)]
    for f in files:
        print(f"not formatted (4-space indent, original key order): {f}")
    sys.exit(1 if files else 0)
