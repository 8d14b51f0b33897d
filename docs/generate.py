"""Write the generated tables into the reference pages, from the tables in the code.

    .venv/bin/python docs/generate.py           # rewrite the stale tables
    .venv/bin/python docs/generate.py --check   # only say which are stale (exit 1)

A generated table sits between two comments in its page,
``<!-- generated: NAME -->`` and ``<!-- end generated -->``; NAME is a key of
``TABLES``. Everything outside them is written by hand. tests/test_docs.py fails
when a page's table is not what this script would write.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway import errors, settings  # noqa: E402 - after the project is on the path

__all__ = ["PAGES", "TABLES", "main", "render"]

TABLES: dict[str, Callable[[], str]] = {
    "settings.CONFIG": lambda: settings.markdown_table(settings.CONFIG),
    "settings.ENVIRONMENT": lambda: settings.markdown_table(settings.ENVIRONMENT),
    "errors.CODES": errors.markdown_table,
    "errors.DIALECTS": errors.dialect_table,
}
PAGES = tuple(
    ROOT / "docs" / "reference" / name for name in ("config.md", "environment.md", "errors.md")
)
_BLOCK = re.compile(r"(<!-- generated: (\S+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def render(text: str) -> str:
    """Return ``text`` with every generated block holding its table as the code has it now."""

    def fill(match: re.Match[str]) -> str:
        start, name, _, end = match.groups()
        return f"{start}{TABLES[name]()}\n{end}"

    return _BLOCK.sub(fill, text)


def main(argv: list[str]) -> int:
    """Rewrite (or with ``--check``, only list) the pages whose tables are stale."""
    check = "--check" in argv
    stale = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        fresh = render(text)
        if fresh != text:
            stale.append(page.relative_to(ROOT))
            if not check:
                page.write_text(fresh, encoding="utf-8")
    verb = "stale" if check else "rewritten"
    for page in stale:
        print(f"{page}: {verb}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
