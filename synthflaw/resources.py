"""Where the package finds the files it runs but does not import: the stages' notebooks and the accelerate configs.

Both live at the top of the repository (``notebooks/``, ``accelerate/``), where a reader looks for them; the package
reaches them through ``synthflaw/_shipped/``, whose two entries are links to those folders. A wheel carries the
files themselves there (package data, pyproject.toml), so an installed package finds them without a checkout.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SHIPPED = PACKAGE / "_shipped"


def shipped(folder: str) -> Path:
    """The shipped folder `folder` ("notebooks" or "accelerate"), its link followed (in a checkout: the repository's
    folder, so the notebooks run from the checkout, as they always have); FileNotFoundError saying how to get it
    back."""
    path = SHIPPED / folder
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is missing: synthflaw runs its {folder} from there. In a checkout it is a link to the "
            f"repository's {folder}/ (restore it with git checkout -- synthflaw/_shipped, on a file system that keeps "
            "symbolic links); an installed package has it as package data (reinstall synthflaw from its wheel).")
    return path.resolve()
