import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def corpus_cache() -> Path:
    """One default-corpus cache for the whole session (make test points it at .cache/)."""
    cache = Path(os.environ.setdefault("PREFIX_CACHE_DIR", str(REPO / ".cache" / "prefix")))
    cache.mkdir(parents=True, exist_ok=True)
    return cache
