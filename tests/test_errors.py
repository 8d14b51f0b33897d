"""One table of error codes: everything that can be raised is in it, and it is documented."""

from __future__ import annotations

import ast
from pathlib import Path

from gateway.edge.openapi import build_spec
from gateway.errors import CODES, dialect_table, markdown_table

ROOT = Path(__file__).resolve().parent.parent


def _first_string_args(tree: ast.AST, callee: str) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == callee
        ):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Attribute) and first.attr == "code":
                continue  # passes on a code already raised (and checked) elsewhere
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), (
                f"{callee}(...) at line {node.lineno} must name its code as a literal"
            )
            found.add(first.value)
    return found


def _raised_codes() -> set[str]:
    codes: set[str] = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        tree = ast.parse(path.read_text())
        codes |= _first_string_args(tree, "GatewayError")
        codes |= _first_string_args(tree, "PolicyError")
    return codes


def _gunicorn_codes() -> dict[int, str]:
    tree = ast.parse((ROOT / "gunicorn.conf.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_GUNICORN_CODES":
            return ast.literal_eval(node.value)
    raise AssertionError("gunicorn.conf.py has no _GUNICORN_CODES")


def test_every_code_the_gateway_raises_is_in_the_table():
    raised = _raised_codes()
    assert len(raised) > 10  # the scan found the raise sites
    assert raised <= set(CODES), raised - set(CODES)


def test_gunicorn_conf_copy_agrees_with_the_table():
    for status, code in _gunicorn_codes().items():
        assert CODES[code].status == status, code


def test_docs_error_list_is_the_table():
    assert markdown_table() in (ROOT / "docs" / "reference" / "errors.md").read_text()


def test_openapi_document_lists_every_code_under_its_status():
    responses = build_spec()["paths"]["/proxy"]["post"]["responses"]
    for code, (status, _) in CODES.items():
        assert f"{code}" in responses[str(status)]["description"], code


def test_codes_are_plain_snake_case_names_never_numbers():
    for code in CODES:
        assert code.replace("_", "").isalpha() and code.islower(), code


def test_the_docs_error_types_are_the_table():
    assert dialect_table() in (ROOT / "docs" / "reference" / "errors.md").read_text(), (
        "docs/reference/errors.md is out of date: run docs/generate.py"
    )
