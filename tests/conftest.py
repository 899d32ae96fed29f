import os
from pathlib import Path

import pytest

from shared.nats_server import EmbeddedNats

# Converted weights go to a cache inside the checkout (ignored by git), not the user's home;
# every worker the tests start inherits it.
os.environ.setdefault("PDSERVE_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "weights"))
# Keys and credentials a developer exported for their own stack (README) must not leak into
# the services the tests start: each test says which it wants.
for name in ("PDSERVE_API_KEY", "PDSERVE_NATS_CREDS", "PDSERVE_NATS_TLS_CA", "PDSERVE_NATS_TLS_CERT", "PDSERVE_NATS_TLS_KEY"):
    os.environ.pop(name, None)


@pytest.fixture
def nats_server():
    with EmbeddedNats() as server:
        yield server
