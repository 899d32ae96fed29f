import pytest
import torch

from shared.engine.loader import LoadedModel, load_model


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine torch's worker threads wait on each
    other whenever another process takes a core, and small ops get 4-5x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real model, loaded once for every engine test module (weights are read-only)."""
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return load_model("tiny-llama")
