"""Helpers for the deployment tests: the docs' blocks, Debian programs, streams, a copied app."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

import pytest
import requests
from packaging.requirements import Requirement

from .fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def readme_block(marker: str) -> str:
    """Return the one fenced code block in the docs (docs/ and README.md) holding ``marker``."""
    pages = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
    blocks = [b for page in pages for b in _FENCE.findall(page.read_text()) if marker in b]
    assert len(blocks) == 1, f"the docs must have one code block holding {marker!r}"
    return blocks[0]


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace each key of ``replacements`` in ``text``; every key must occur."""
    for old, new in replacements.items():
        assert old in text, f"the docs' block no longer holds {old!r}"
        text = text.replace(old, new)
    return text


def need(program: str, package: str) -> str:
    """Return the path of ``program`` (a name or a path); skip without it, fail in CI."""
    if os.path.isabs(program):
        path = program if os.path.exists(program) else None
    else:
        path = shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is missing; .ci/run installs Debian's {package}")
        pytest.skip(f"{program} is not installed (apt-get install {package})")
    return path


def wait_for(url: str, timeout: float, what: str, log: Path | None = None) -> None:
    """Wait until ``url`` answers at all (any status); the first answer may start an app."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=max(1.0, deadline - time.monotonic()))
            return
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.1)
    details = log.read_text(errors="replace") if log and log.exists() else ""
    raise AssertionError(f"{what} did not come up at {url}\n{details}")


def stop(process: subprocess.Popen) -> None:
    """Stop a server started by a test, and wait for it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def read_lockstep(response: requests.Response, upstream: FakeUpstream) -> list[bytes]:
    """Read SSE events, releasing the upstream's next event only once one has arrived.

    A proxy that holds events back deadlocks this: the read times out.
    """
    assert response.status_code == 200, response.text
    received, buffer = [], b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            received.append(event)
            upstream.release.release()
    return received


# --- a copy of the app, as a host would hold it -----------------------------------


def _runtime_distributions() -> list[metadata.Distribution]:
    """Return requirements.txt's distributions and everything they need, as installed here."""
    wanted = [
        Requirement(line).name
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    found: dict[str, metadata.Distribution] = {}
    while wanted:
        name = wanted.pop().lower().replace("_", "-")
        if name in found:
            continue
        dist = metadata.distribution(name)
        found[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                wanted.append(req.name)
    return list(found.values())


def install_app(dest: Path, python: str) -> Path:
    """Copy the gateway to ``dest`` with a venv of ``python``; return the venv's python.

    The packages are copied from this test run's venv (same versions, nothing
    downloaded), so the copy runs with no access to the project or to root's files.
    """
    dest.mkdir(parents=True)
    shutil.copytree(
        ROOT / "gateway", dest / "gateway", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "wsgi.py", dest / "wsgi.py")
    (dest / "instance").mkdir()
    subprocess.run([python, "-m", "venv", "--without-pip", str(dest / ".venv")], check=True)
    out = subprocess.run(
        [
            str(dest / ".venv/bin/python"),
            "-c",
            "import sysconfig; print(sysconfig.get_path('purelib'))",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    site = Path(out.stdout.strip())
    for dist in _runtime_distributions():
        for file in dist.files or []:
            source = Path(dist.locate_file(file))
            if file.parts[0] == ".." or not source.is_file():
                continue  # console scripts and the like: outside site-packages
            (site / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, site / file)
    return dest / ".venv/bin/python"


def give_to(path: Path, user: str) -> None:
    """Make ``user`` own everything under ``path``, as the app's own account would."""
    shutil.chown(path, user, user_group(user))
    for parent, dirs, files in os.walk(path):
        for name in dirs + files:
            shutil.chown(os.path.join(parent, name), user, user_group(user))


def user_group(user: str) -> str:
    import grp
    import pwd

    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
