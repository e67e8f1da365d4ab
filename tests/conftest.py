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
