"""Print the markdown table of every bad input (tests/bad_inputs.py CASES) and the message it gets,
for docs/reliability.md: HARNESS_DATA_DIR=../shared/data python scripts/bad_inputs_table.py"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.bad_inputs import CASES, run_case  # noqa: E402


def main() -> int:
    print("| input | exit | message |\n|---|---|---|")
    for what, argv, text, _ in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            code, err = run_case(argv, text, tmp)
        message = err.strip().replace("|", "\\|").replace("\n", " / ")
        print(f"| {what} | {code} | `{message}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
