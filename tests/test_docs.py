"""The docs: generated references are current, examples load and run, links resolve.

Every ``yaml`` and ``sh`` block a reader would copy from ``docs/`` or the README
is checked here (the deployment blocks are run in tests/deploy/):

- a YAML block is a whole gateway config, loaded through the gateway's loader;
  one whose first line is ``# in instance/config.yaml`` is part of one, merged
  into the example config first; Prometheus blocks are parsed and what they name
  must exist; ``# not loaded by the tests: <why>`` skips one;
- a shell block runs with ``bash -e`` in a copy of the project set up as after
  the quick start, and must exit 0; ``# not run by the tests: <why>`` skips one.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway import errors, settings
from gateway.config.source import load_config
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
_FENCE = re.compile(r"^( *)```(\w*)[^\n]*\n(.*?)^\1```", re.S | re.M)
_SKIP = {"yaml": "# not loaded by the tests:", "sh": "# not run by the tests:"}
_PART = "# in instance/config.yaml"
_PROMETHEUS = ("# prometheus.yml", "# Prometheus rules:")
# The README's two setup commands are checked by the test_the_readme_* tests instead:
# one serves until stopped, the other is this test suite.
_SETUP = ("gunicorn -c gunicorn.conf.py wsgi:app", "&& .venv/bin/python -m pytest\n")
# The key the example config's chat-app accepts, as an app would hold it.
EXAMPLE_KEY = "ck-example-chat-app-change-me"


def _blocks(language: str) -> list:
    found = []
    for page in PAGES:
        blocks = _FENCE.findall(page.read_text(encoding="utf-8"))
        for n, (indent, lang, body) in enumerate(blocks, 1):
            if lang == language:
                text = "\n".join(line[len(indent) :] for line in body.splitlines()) + "\n"
                name = f"{page.relative_to(ROOT)}, block {n}"
                found.append(pytest.param(page, text, id=name))
    return found


def _first_line(text: str) -> str:
    return text.lstrip().split("\n", 1)[0]


def _skip_reason(text: str, language: str) -> str | None:
    first = _first_line(text)
    if not first.startswith(_SKIP[language]):
        if language == "sh" and any(command in text for command in _SETUP):
            return "a README setup command: see test_the_readme_test_command_is_what_ci_runs"
        return None
    reason = first[len(_SKIP[language]) :].strip()
    assert len(reason) > 10, f"say why the block is not checked: {first!r}"
    return reason


# -- generated references ---------------------------------------------------------------


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", _generator().PAGES, ids=lambda p: p.name)
def test_each_generated_reference_is_what_the_code_says(page):
    text = page.read_text(encoding="utf-8")
    assert "<!-- generated: " in text, f"{page.name} has no generated table"
    assert _generator().render(text) == text, (
        f"{page.relative_to(ROOT)} is out of date: run .venv/bin/python docs/generate.py"
    )


def test_the_references_name_every_setting_and_code():
    config = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    environment = (DOCS / "reference" / "environment.md").read_text(encoding="utf-8")
    codes = (DOCS / "reference" / "errors.md").read_text(encoding="utf-8")
    assert all(f"| `{s.key}` |" in config for s in settings.CONFIG)
    assert all(f"| `{s.key}` |" in environment for s in settings.ENVIRONMENT)
    assert all(f"| `{code}` |" in codes for code in errors.CODES)


def test_the_generator_rewrites_a_stale_table(tmp_path):
    generate = _generator()
    stale = "# x\n<!-- generated: errors.CODES -->\n| old |\n<!-- end generated -->\n"
    assert generate.render(stale) == (
        f"# x\n<!-- generated: errors.CODES -->\n{errors.markdown_table()}\n"
        "<!-- end generated -->\n"
    )


# -- YAML blocks --------------------------------------------------------------------------


def _merge(base: dict, part: dict) -> dict:
    merged = dict(base)
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _placeholders(text: str) -> dict[str, str]:
    names = set(re.findall(r"\$\{([A-Z0-9_]+)\}", text))
    return {name: f"placeholder-{name.lower()}-0123456789" for name in names}


_METRICS = {
    "gateway_requests_total",
    "gateway_request_duration_seconds",
    "gateway_upstream_ttfb_seconds",
    "gateway_in_flight",
    "gateway_tokens_total",
    "gateway_refusals_total",
    "gateway_config_reloads_total",
    "gateway_budget_used",
    "gateway_budget_limit",
}


def _check_prometheus(text: str) -> None:
    document = yaml.safe_load(text)
    assert isinstance(document, dict) and ("scrape_configs" in document or "groups" in document)
    for group in document.get("groups", []):
        for rule in group["rules"]:
            assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"]
            for metric in re.findall(r"\bgateway_[a-z_]+", rule["expr"]):
                assert metric in _METRICS, f"no metric {metric}"
            for code in re.findall(r'code=~?"([^"]+)"', rule["expr"]):
                for one in code.split("|"):
                    assert one in errors.CODES, f"no error code {one}"


def test_the_metric_names_the_docs_may_use_are_the_gateways():
    # The reload counter is the gunicorn master's, the rest each worker's.
    source = "".join(
        (ROOT / name).read_text(encoding="utf-8")
        for name in ("gateway/observe/metrics.py", "gunicorn.conf.py")
    )
    for name in _METRICS:
        assert f'"{name.removesuffix("_total")}"' in source, name


@pytest.mark.parametrize(("page", "text"), _blocks("yaml"))
def test_each_yaml_block_is_a_valid_config(page, text, tmp_path):
    reason = _skip_reason(text, "yaml")
    if reason:
        pytest.skip(reason)
    if _first_line(text).startswith(_PROMETHEUS):
        _check_prometheus(text)
        return
    if _first_line(text).startswith(_PART):
        example = yaml.safe_load((ROOT / "instance" / "config.example.yaml").read_text())
        text = yaml.safe_dump(_merge(example, yaml.safe_load(text)), sort_keys=False)
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        config = load_config(path, _placeholders(text))
    except ConfigError as exc:
        pytest.fail(f"the block in {page.name} does not load:\n" + "\n".join(exc.problems))
    if page.name != "upgrading-from-seed.md":
        # The docs teach hashed keys; only the upgrade guide shows a plaintext one.
        assert not any(item.plaintext for c in config.clients for item in c.keys), page.name


# -- shell blocks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project as after the quick start and copying the example config."""
    copy = tmp_path_factory.mktemp("project")
    for name in ("gateway", "docs"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("wsgi.py", "gunicorn.conf.py", "requirements.txt", ".env.example"):
        shutil.copy(ROOT / name, copy / name)
    (copy / "instance").mkdir()
    shutil.copy(ROOT / "instance" / "config.example.yaml", copy / "instance")
    shutil.copy(ROOT / "instance" / "config.example.yaml", copy / "instance" / "config.yaml")
    shutil.copy(ROOT / ".env.example", copy / ".env")
    (copy / ".venv").symlink_to(Path(sys.executable).parent.parent)
    # What the blocks say they use: an old plaintext key in key.txt, a request body.
    (copy / "key.txt").write_text(EXAMPLE_KEY + "\n")
    (copy / "body.json").write_text(
        '{"model": "openai/gpt-4o-mini", "max_tokens": 64,'
        ' "messages": [{"role": "user", "content": "Hi"}]}'
    )
    return copy


def _run(project: Path, text: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "FLASK_"))}
    env["GATEWAY_EXPLAIN_KEY"] = EXAMPLE_KEY
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", text],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


_SHELL = _blocks("sh")


@pytest.fixture(scope="module")
def shell_results(project) -> dict[str, subprocess.CompletedProcess]:
    """Run every shell block that is to be run, a few at once (each starts Python)."""
    texts = {p.values[1] for p in _SHELL}
    texts = {t for t in texts if not _skip_reason(t, "sh")}
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        return dict(zip(texts, pool.map(lambda t: _run(project, t), texts), strict=True))


@pytest.mark.parametrize(("page", "text"), _SHELL)
def test_each_shell_block_runs(page, text, request):
    reason = _skip_reason(text, "sh")
    if reason:
        pytest.skip(reason)
    done = request.getfixturevalue("shell_results")[text]
    assert done.returncode == 0, f"{page.name}:\n{text}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr


def _readme_command(what: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [b for _, lang, b in _FENCE.findall(readme) if lang == "sh" and what in b]
    assert len(commands) == 1, f"README.md must have one sh block with {what!r}"
    return commands[0].strip().splitlines()[-1]


def test_the_readme_test_command_is_what_ci_runs():
    command = _readme_command(".venv/bin/python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == command


def test_the_readme_serve_command_serves_the_example_config():
    # Not run here (it serves until stopped); what it starts is run by the live tests.
    command = _readme_command("gunicorn -c gunicorn.conf.py wsgi:app")
    assert "GATEWAY_CONFIG=instance/config.example.yaml" in command
    assert "cp .env.example .env" in command


# -- links ----------------------------------------------------------------------------


def _anchors(page: Path) -> set[str]:
    """Return GitHub's anchors for the headings of ``page``."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    text = re.sub(r"^ *```.*?^ *```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        assert linked.exists(), f"{page.name}: {target} names no file"
        if anchor:
            assert anchor in _anchors(linked), f"{page.name}: {target} names no heading"


def test_the_map_of_the_docs_links_every_page():
    listed = (DOCS / "README.md").read_text(encoding="utf-8")
    for page in DOCS.rglob("*.md"):
        if page.name != "README.md":
            assert f"]({page.relative_to(DOCS)})" in listed, page


def test_every_test_file_the_docs_name_exists():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for name in re.findall(r"\btests/[\w/]+\.py", text):
            assert (ROOT / name).exists(), f"{page.name} names {name}, which does not exist"
        for name, test in re.findall(r"\b(tests/[\w/]+\.py)::(\w+)", text):
            assert f"def {test}(" in (ROOT / name).read_text(), f"{page.name}: {name}::{test}"
