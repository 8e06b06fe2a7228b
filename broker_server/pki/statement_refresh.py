"""Keep the signed MODELs retained on the broker from expiring: re-sign them in time.

A channel announcement and a staged rollout's directed MODELs stay **retained** on the broker for
as long as they are the server's word, and a device that connects later gets the retained copy.
Once statements expire (``[ota] statement_lifetime``, :mod:`.release_signer`), a retained copy
older than the lifetime would be refused by that device, so the server re-publishes every
retained statement, re-signed with a later ``expires_at`` and the same ``issued_at``, once a
quarter of its lifetime is left (:meth:`ReleaseSigner.refresh_at`).

:class:`StatementRefresher` is a :class:`~edge_agent.transport.base.Transport` decorator, like
``MeteredTransport``: it wraps the server's transport and sees every publish, so neither the
model publisher nor the rollout controller has to report what they retained::

    signer = ReleaseSigner.from_file(key_path, lifetime_s=86400)
    server = FederatedServer(StatementRefresher(transport, signer), bundle, config)
    server.publisher.sign_with(signer.sign)

* **What it keeps.** The last retained publish on each topic: a MODEL signed by the refresher's key
  with an expiry is remembered; any other retained publish on that topic (an unsigned MODEL, one
  without expiry, another payload, an empty one that clears it) forgets the topic. So only what
  the broker actually retains is ever re-signed, and never a statement the server has replaced.
* **When.** Every :meth:`receive` — the server loop's heartbeat: the dispatcher pumps it many
  times a second — first re-signs what is due (a heap by due time: nothing is scanned). Doing it
  on the loop that makes every other publish means a re-signed copy can never overtake a newer
  statement; a lock also orders it against publishes from other threads.
* **Failures.** A refresh whose publish fails (broker away) is retried after ``retry_s``; the
  error is logged, never raised into the loop.

Not kept across a server restart: the restarted server announces its channel again and re-sends
the directed MODELs whose target differs from the channel's; a directed MODEL it does not re-send
(a device already on the channel's version) expires on the broker. A device that then reconnects
refuses it (reported once, ``statement_expired``) and keeps running its model.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections import Counter

from broker_server.pki.release_signer import ReleaseSigner
from edge_agent.errors import ProtocolError, TransportError
from edge_agent.protocol.messages import decode_message, encode_message
from edge_agent.protocol.model_messages import ModelMessage
from edge_agent.transport.base import InboundMessage, Transport

__all__ = ["StatementRefresher"]

log = logging.getLogger("fedflock.server.statements")


class StatementRefresher:
    def __init__(self, inner: Transport, signer: ReleaseSigner, *, retry_s: float = 60.0) -> None:
        if signer.lifetime_s is None:
            raise ValueError("a StatementRefresher needs a signer with a statement lifetime")
        self.inner, self.signer = inner, signer
        self._retry_ms = round(retry_s * 1000)
        #: statements re-signed, refreshes that failed (to be retried)
        self.counters: Counter[str] = Counter()
        self._retained: dict[str, tuple[ModelMessage, int, int]] = {}  # topic -> (statement, generation, due ms)
        self._due: list[tuple[int, int, str]] = []  # (due ms, generation, topic); stale entries are skipped
        self._generation = 0
        self._lock = threading.RLock()

    def retained(self) -> dict[str, ModelMessage]:
        """The signed statements being kept fresh, by topic (a copy)."""
        with self._lock:
            return {topic: entry[0] for topic, entry in self._retained.items()}

    # -- Transport -------------------------------------------------------------------------------

    def start(self) -> None:
        self.inner.start()

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s: float | None = None
    ) -> None:
        with self._lock:
            self.inner.publish(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)
            if retain:
                self._track(topic, _signed_model(payload))

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        self.inner.subscribe(topic_filter, qos=qos)

    def receive(self, timeout: float | None = None) -> InboundMessage | None:
        self.refresh()
        return self.inner.receive(timeout=timeout)

    def close(self) -> None:
        self.inner.close()

    # -- refreshing ------------------------------------------------------------------------------

    def refresh(self) -> int:
        """Re-sign and re-publish every retained statement that is due; returns how many were."""
        with self._lock:
            now = self.signer.now_ms()
            done = 0
            while self._due and self._due[0][0] <= now:
                _, generation, topic = heapq.heappop(self._due)
                entry = self._retained.get(topic)
                if entry is None or entry[1] != generation:
                    continue  # replaced or forgotten since
                done += self._refresh_one(topic, entry[0], now)
            return done

    def _refresh_one(self, topic: str, message: ModelMessage, now: int) -> int:
        renewed = self.signer.resign(message)
        try:
            self.inner.publish(topic, encode_message(renewed), qos=1, retain=True)
        except TransportError as exc:
            self.counters["failed"] += 1
            log.warning(
                "cannot re-sign the retained MODEL v%d on %s (retrying): %s", message.version, topic, exc.reason
            )
            self._track(topic, message, due=now + self._retry_ms)
            return 0
        self.counters["resigned"] += 1
        log.info("re-signed the retained MODEL v%d on %s until %d", renewed.version, topic, renewed.expires_at)
        self._track(topic, renewed)
        return 1

    def _track(self, topic: str, message: ModelMessage | None, *, due: int | None = None) -> None:
        """Remember ``message`` as what ``topic`` retains (None, or a statement that never needs
        re-signing: forget the topic); re-sign it at ``due`` (default: the signer's refresh time)."""
        if message is not None and due is None:
            due = self.signer.refresh_at(message)
        if message is None or due is None:
            self._retained.pop(topic, None)
            return
        self._generation += 1
        self._retained[topic] = (message, self._generation, due)
        heapq.heappush(self._due, (due, self._generation, topic))
        if len(self._due) > 2 * len(self._retained) + 1024:  # mostly stale entries: rebuild
            self._due = [(when, generation, name) for name, (_, generation, when) in self._retained.items()]
            heapq.heapify(self._due)


def _signed_model(payload: bytes) -> ModelMessage | None:
    """The MODEL in a retained payload, or None (anything else, including an empty payload that clears it)."""
    if not payload:
        return None
    try:
        message = decode_message(payload)
    except ProtocolError:  # not a fedflock envelope: nothing this refresher could keep fresh
        return None
    return message if isinstance(message, ModelMessage) else None
