"""Sphinx configuration for the jtransfer docs (built in CI with warnings as errors)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The API pages import jtransfer and porting; keep that import quiet and cheap.
os.environ.setdefault("JTRANSFER_HUGEPAGES", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jtransfer  # noqa: E402

project = "jtransfer"
author = "the jtransfer developers"
copyright = "2026, the jtransfer developers"
version = release = jtransfer.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "build", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_mock_imports: list[str] = []
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# The docstrings write `code` in Markdown style; render single backticks as literals.
default_role = "code"

html_theme = "sphinx_book_theme"
html_title = "jtransfer"
html_theme_options = {
    "show_toc_level": 2,
}
# Napoleon's "Attributes:" as fields, not as attribute entries: Flax modules are dataclasses,
# whose fields autodoc documents already.
napoleon_use_ivar = True


def _skip_reexported_classes(app, what, name, obj, skip, options):
    """A class re-exported by a package (`porting.PortingError`) is documented where it is
    defined only, so a `Raises: PortingError` names one target, not two."""
    if skip or not isinstance(obj, type):
        return None
    module = getattr(app.env, "temp_data", {}).get("autodoc:module")
    if module and getattr(obj, "__module__", module) != module and what == "module":
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_reexported_classes)
