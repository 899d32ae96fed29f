import os
from pathlib import Path

import pytest

from shared.nats_server import EmbeddedNats

# Converted weights go to a cache inside the checkout (ignored by git), not the user's home;
# every worker the tests start inherits it.
os.environ.setdefault("PDSERVE_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "weights"))


@pytest.fixture
def nats_server():
    with EmbeddedNats() as server:
        yield server
