import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"real test data not found at {SHARED} (CI clones the repo beside shared/)")
    return SHARED


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    from pretext.quickstart import sample_dir

    return sample_dir()


@pytest.fixture
def refused_in_one_line():
    """Run ``python -m pretext.cli <args>`` in a subprocess and assert that it is refused as a user expects: exit
    code ``rc`` (2: a bad setting), exactly one line on stderr (containing every string in ``expect``), no
    traceback, and none of ``must_not_exist`` created. Returns the CompletedProcess."""
    import subprocess
    import sys

    def check(args, expect=(), must_not_exist=(), rc=2, cwd=None, env=None, timeout=180):
        e = dict(os.environ, **(env or {}))
        e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-m", "pretext.cli", *map(str, args)], capture_output=True, text=True,
                              cwd=cwd, env=e, timeout=timeout)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        shown = f"args={list(map(str, args))}\nrc={proc.returncode}\nstderr:\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, shown
        assert proc.returncode == rc, shown
        assert len(lines) == 1, shown
        for s in ([expect] if isinstance(expect, str) else expect):
            assert s in lines[0], shown
        for p in must_not_exist:
            assert not os.path.exists(p), f"{p} was created\n{shown}"
        return proc

    return check
