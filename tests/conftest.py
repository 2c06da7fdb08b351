import os
from pathlib import Path

import pytest

from metarec_dist.data.store import DomainStore

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real data sets live beside the repository (../shared/data), never inside it.
SHARED_DATA = Path(os.environ.get("METAREC_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "Beauty.txt").is_file():
        pytest.fail(f"real data not found at {SHARED_DATA}; set METAREC_SHARED_DATA to the shared/data folder")
    return SHARED_DATA


@pytest.fixture
def store(tmp_path) -> DomainStore:
    return DomainStore(tmp_path / "store")
