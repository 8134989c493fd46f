"""Regenerate the run-config defaults in pyproject.toml and the table in docs/configuration.md
from fedslim.config (the single source of truth). Run after adding or changing a key:

    python scripts/sync_config_docs.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedslim.config import key_table

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    rows = key_table()
    toml = "\n".join(f"{k} = {json.dumps(d)}" for k, _t, d, _h in rows)
    py = ROOT / "pyproject.toml"
    text = py.read_text()
    text = re.sub(r"(\[tool\.flwr\.app\.config\]\n)(.*?)(\n\n\[)", lambda m: m.group(1) + toml
                  + m.group(3), text, flags=re.S)
    py.write_text(text)
    table = "| key | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(
        f"| `{k}` | {t} | `{json.dumps(d)}` | {h} |" for k, t, d, h in rows)
    doc = ROOT / "docs" / "configuration.md"
    text = doc.read_text()
    text = re.sub(r"\| key \| type \| default \| meaning \|\n.*?\n\n", table + "\n\n", text,
                  flags=re.S)
    doc.write_text(text)


if __name__ == "__main__":
    main()
