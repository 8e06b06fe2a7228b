"""Operations: Prometheus metrics, a JSON status API, health probes and a web dashboard.

Stdlib only. The pieces, each usable alone:

* :class:`ServerMetrics` (:mod:`.metrics`) — what the server counts, one method per event,
  rendered in the Prometheus text format 0.0.4 (:mod:`.prometheus` holds the primitives);
* :class:`MeteredTransport` (:mod:`.metered`) — wraps the server's transport to count bytes in/out;
* :func:`build_status` (:mod:`.status`) — the JSON status document from the server's state;
* :class:`OpsServer` (:mod:`.web`) — ``/metrics``, ``/api/status``, ``/healthz``, ``/readyz`` and
  the dashboard (``static/``: plain HTML, CSS and JavaScript, no external assets) on a thread.
"""

from __future__ import annotations

from broker_server.ops.metered import MeteredTransport
from broker_server.ops.metrics import ServerMetrics
from broker_server.ops.status import build_status
from broker_server.ops.web import OpsServer

__all__ = ["MeteredTransport", "OpsServer", "ServerMetrics", "build_status"]
