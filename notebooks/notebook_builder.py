"""What every ``build_*.py`` here ends with: write its cells as an unexecuted notebook beside it."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_notebook

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def write_notebook(cells: list, name: str) -> Path:
    """Write ``cells`` to ``notebooks/<name>`` (the test suite executes it)."""
    path = Path(__file__).with_name(name)
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC}), path)
    print(f"wrote {path}")
    return path
