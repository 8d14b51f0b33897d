"""The README's systemd unit, as systemd itself reads it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..deploy_support import ROOT, readme_block, substitute


def test_the_unit_is_complete_and_systemd_accepts_it(tmp_path):
    unit = readme_block("# systemd unit:")
    for line in ("[Unit]", "[Service]", "[Install]", "User=gateway", "WantedBy=multi-user.target"):
        assert line in unit.splitlines(), f"the unit lacks {line}"
    assert re.search(r"^EnvironmentFile=\S+", unit, re.M)
    # A reload checks the config as the service (its user and environment) before the HUP.
    reloads = re.findall(r"^ExecReload=(.*)$", unit, re.M)
    assert len(reloads) == 2 and "check-config" in reloads[0] and "-HUP" in reloads[1]

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (it comes with systemd)")
    # verify checks that every command exists: point the unit at this checkout and venv.
    venv_bin = Path(sys.executable).parent
    path = tmp_path / "gateway.service"
    path.write_text(
        substitute(
            unit,
            {
                "/srv/gateway/.venv/bin/": f"{venv_bin}/",
                "/srv/gateway/.env": str(ROOT / ".env.example"),
                "/srv/gateway": str(ROOT),
            },
        )
    )
    done = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    # Unknown keys and bad values are warnings on stderr, naming the file.
    warnings = [line for line in done.stderr.splitlines() if path.name in line]
    assert done.returncode == 0 and not warnings, done.stderr
