"""A straggler's BatchNorm statistics are rebased on a server without a store, too.

NEEDS THE GLUE: ``RoundEngine._complete`` calling ``LateUpdates.remember`` with the model it is
about to replace (see the late-updates report). With a store the versions' weights come from it
(``test_async_late_updates.py``); without one only the engine can tell.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.runtime.bundle import Bundle
from tests.broker_server.test_async_late_updates import straggler_federation


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


def test_without_a_store_the_late_update_s_statistics_are_rebased_too(bundle: Bundle) -> None:
    server = straggler_federation(bundle, None)
    # the hand-computed values of test_a_late_update_s_batchnorm_statistics_are_rebased_not_added:
    # var √2/20 (not the negative 0.1 − 0.95·√2/(1+√2)), mean (20·0.2 − 20√2·0.4) / (20 + 20√2)
    np.testing.assert_allclose(server.weights["1.running_var"], np.full(8, 0.070711), atol=2e-6)
    np.testing.assert_allclose(server.weights["1.running_mean"], np.full(8, -0.151472), atol=2e-6)
