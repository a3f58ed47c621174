"""The README's Python examples run as written (the code is the documentation's source of truth)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should show how to compose the losses"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
