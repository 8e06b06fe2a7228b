"""Three releases of the digits bundle (v1 as exported, v2 and v3 with scaled weights), shared by
the model store and updater tests."""

from __future__ import annotations

import pytest

from edge_agent.runtime.bundle import Bundle
from tests.edge_agent.ota import Release, derive_bundle, release


@pytest.fixture(scope="module")
def v1(digits_bundle: Bundle) -> Release:
    return release(digits_bundle.directory)


@pytest.fixture(scope="module")
def v2(digits_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Release:
    return release(derive_bundle(digits_bundle.directory, tmp_path_factory.mktemp("v2") / "b", scale=0.5))


@pytest.fixture(scope="module")
def v3(digits_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Release:
    return release(derive_bundle(digits_bundle.directory, tmp_path_factory.mktemp("v3") / "b", scale=2.0))
