"""Griffe extension for the API reference: read ``Example:`` as a Google ``Examples:`` section.

sgdlens docstrings head their doctests ``Example:`` (STYLE.md); griffe reads only the plural
as an examples section and renders the singular as a prose admonition, which mangles
``>>>`` lines. This renames the header before griffe parses the docstring.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADER = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rewrite ``Example:`` section headers to ``Examples:``."""

    def _fix(self, obj: Any) -> None:
        doc = getattr(obj, "docstring", None)
        if doc is not None and "Example:" in doc.value:
            doc.value = _HEADER.sub(r"\1Examples:", doc.value)

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        self._fix(obj)
