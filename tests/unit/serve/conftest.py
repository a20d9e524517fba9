"""One tiny real index, model and app for every serving test in the session."""

import pytest
from fastapi.testclient import TestClient

from dual_encoder.config import ServeConfig
from dual_encoder.search import Searcher
from dual_encoder.serve import create_app
from tests.tiny import build_tiny_index


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory):
    return build_tiny_index(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="session")
def searcher(index_dir):
    return Searcher.load(index_dir)


@pytest.fixture(scope="session")
def client(searcher):
    # The context manager runs the app's lifespan (the micro-batcher's worker). Server exceptions are
    # re-raised into the test, so a bad input that reaches the last-resort 500 handler fails loudly.
    with TestClient(create_app(searcher, ServeConfig())) as test_client:
        yield test_client
