"""When the CRL must be re-signed (``fedflock pki crl --renew``): a pure decision on the CRL's bytes.

A CRL carries a *next update* time. Once it has passed, OpenSSL treats the CRL as expired and
Mosquitto (``crlfile``, verified with 2.0.11 in tests/integration/test_crl_renewal.py) refuses
**every** client certificate, revoked or not: the whole fleet is locked out. So the CRL is
re-signed on a schedule (the systemd timer in ``deploy/broker/``, daily), but only when it is
due, so that the daily run is idempotent and Mosquitto is reloaded only when the file changed.

It is due (:func:`renewal_reason` says why) when:

* there is no CRL, or it does not parse, or it is not signed by this CA (a restored backup, a
  copied directory);
* it has no next-update time;
* the serials it lists differ from the index's revoked certificates (a revocation whose CRL
  write did not happen, an index edited by hand);
* its next update is at most ``renew_before`` away (or past).

``cryptography``'s errors are translated at this boundary: an unreadable CRL is simply "due".
"""

from __future__ import annotations

import datetime
from collections.abc import Set

from cryptography import x509

from broker_server.pki.certs import CertificateAuthority

__all__ = ["CRL_RENEW_BEFORE_DAYS", "next_update", "renewal_reason"]

#: re-sign once the next update is this close (a daily timer then has ten tries before it matters)
CRL_RENEW_BEFORE_DAYS = 10


def _load(crl_pem: bytes) -> x509.CertificateRevocationList | None:
    try:
        return x509.load_pem_x509_crl(crl_pem)
    except ValueError:
        return None


def next_update(crl_pem: bytes) -> datetime.datetime | None:
    """The CRL's next-update time (UTC), or None when it has none or does not parse."""
    crl = _load(crl_pem)
    return crl.next_update_utc if crl is not None else None


def renewal_reason(
    crl_pem: bytes | None,
    ca: CertificateAuthority,
    revoked: Set[int],
    now: datetime.datetime,
    renew_before: datetime.timedelta,
) -> str | None:
    """Why the CRL ``crl_pem`` (None: missing) must be re-signed now, or None when it need not be.

    ``revoked`` are the serials the index marks revoked.
    """
    if crl_pem is None:
        return "there is no CRL"
    crl = _load(crl_pem)
    if crl is None:
        return "the CRL does not parse"
    if crl.issuer != ca.cert.subject or not crl.is_signature_valid(ca.key.public_key()):
        return "the CRL is not signed by this CA"
    expiry = crl.next_update_utc
    if expiry is None:
        return "the CRL has no next-update time"
    listed = {entry.serial_number for entry in crl}
    if listed != set(revoked):
        return f"the CRL lists {len(listed)} revoked certificate(s), the index {len(revoked)}"
    if expiry <= now:
        return f"the CRL expired at {expiry.isoformat()}: Mosquitto refuses every client until it is renewed"
    if expiry - now <= renew_before:
        return f"the CRL's next update {expiry.isoformat()} is less than {renew_before.days} day(s) away"
    return None
