import pytest

from shared.nats_server import EmbeddedNats


@pytest.fixture
def nats_server():
    with EmbeddedNats() as server:
        yield server
