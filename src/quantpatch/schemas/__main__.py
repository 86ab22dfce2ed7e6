"""``python -m quantpatch.schemas``: regenerate the shipped schema files from the code."""

from __future__ import annotations

import json
from pathlib import Path

from quantpatch._io import write_text_atomic
from quantpatch.schemas import KINDS, generate


def main() -> None:
    folder = Path(__file__).parent
    for kind in KINDS:
        path = folder / f"{kind}.schema.json"
        write_text_atomic(path, json.dumps(generate(kind), indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
