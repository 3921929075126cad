"""The README's library example runs as written (imports from the package's top level)."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def library_example() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_library_example_runs():
    code = library_example()
    assert "assert_equivariant(" in code  # the example checks itself
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
