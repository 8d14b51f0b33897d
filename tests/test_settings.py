"""One table of settings: every config key and GATEWAY_* variable in it, once, and documented."""

from __future__ import annotations

import re
from pathlib import Path

from marshmallow import fields, validate

from gateway import settings
from gateway.config.schema import ConfigSchema

ROOT = Path(__file__).resolve().parent.parent


def _schema_keys(schema, prefix: str = "") -> dict[str, fields.Field]:
    """Return every key the config schema accepts, as the table writes it, with its field."""
    found = {}
    for name, field in schema._declared_fields.items():
        key = f"{prefix}{name}"
        if isinstance(field, fields.Nested):
            found |= _schema_keys(field.schema, key + ".")
        elif isinstance(field, fields.Dict) and isinstance(field.value_field, fields.Nested):
            found[key] = field
            found |= _schema_keys(field.value_field.schema, key + ".<name>.")
        else:
            found[key] = field
    return found


def test_every_config_key_is_in_the_table_once_and_nothing_else_is():
    table = [s.key for s in settings.CONFIG]
    assert len(table) == len(set(table))
    assert set(table) == set(_schema_keys(ConfigSchema())), set(table) ^ set(
        _schema_keys(ConfigSchema())
    )


def test_every_integer_key_takes_its_range_from_the_table():
    for key, field in _schema_keys(ConfigSchema()).items():
        known = settings.setting(key)
        if isinstance(field, fields.Integer):
            (rule,) = [v for v in field.validators if isinstance(v, validate.Range)]
            assert (rule.min, rule.max) == (known.low, known.high), key
            assert known.kind == "integer", key
        else:
            assert known.low is None and known.high is None, key


def test_every_default_is_within_its_range():
    for known in (*settings.CONFIG, *settings.ENVIRONMENT):
        if known.low is not None and known.default is not None:
            assert known.low <= known.default <= known.high, known.key


def _variables_read() -> set[str]:
    sources = [ROOT / "gunicorn.conf.py", ROOT / "wsgi.py", *(ROOT / "gateway").rglob("*.py")]
    found = set()
    for path in sources:
        if path.name == "settings.py":
            continue
        found |= set(re.findall(r"\bGATEWAY_[A-Z_]+\b", path.read_text()))
    # Flask config names the app keeps (not read from the environment by that name)
    return found - {"GATEWAY_ENVIRON"}


def test_every_gateway_variable_the_code_reads_is_in_the_table():
    table = {s.key for s in settings.ENVIRONMENT}
    assert _variables_read() == table, _variables_read() ^ table


def test_the_docs_reference_is_the_table():
    reference = ROOT / "docs" / "reference"
    for table, page in ((settings.CONFIG, "config.md"), (settings.ENVIRONMENT, "environment.md")):
        assert settings.markdown_table(table) in (reference / page).read_text(), (
            f"docs/reference/{page} is out of date: run .venv/bin/python docs/generate.py"
        )
