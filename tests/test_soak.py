"""The soak, short: twml commands killed at random (SIGKILL, SIGTERM) against one SQLite store,
resumed from `twml runs`; benchmarks/soak.py checks what must hold and counts failures. The
full version (10 minutes, SQLite and a server) is a benchmark. Slow (about 75 s on 2 cores):
`pytest -m slow` runs it; tests/test_resume.py kills and resumes each study in the default run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


@pytest.mark.slow
@pytest.mark.e2e
def test_a_short_soak_with_kills_ends_with_no_failure(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SOAK), "--minutes", "0.5", "--store", "sqlite", "--kill-every", "2", "--out", tmp_path],
        capture_output=True,
        text=True,
        timeout=600,
    )
    result = json.loads((tmp_path / "soak-sqlite.json").read_text())
    assert done.returncode == 0 and result["failures"] == 0, result["failure_list"]
    assert result["kills"] >= 5 and result["processes"] >= 8, result  # it did run and kill
    assert set(result["statuses"]) <= {"FINISHED", "KILLED"}
    assert (tmp_path / "sqlite" / "reports" / "final" / "soak.md").is_file()
