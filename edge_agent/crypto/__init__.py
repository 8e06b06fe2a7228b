"""Signed artifacts (issue #7): Ed25519 verification in pure Python and the device's trusted keys.

* :mod:`.ed25519` — RFC 8032 verification, no dependency (devices do not install ``cryptography``).
* :mod:`.trust` — :class:`TrustedKeys` (``[ota] trusted_keys``) and the checks of a MODEL's release
  statement and of a bundle's ``manifest.sig``; failures raise :class:`SignatureError`.
* :mod:`.freshness` — when a signed statement holds (``expires_at``, clock skew, ``[ota]
  require_expiry``); a statement outside its window raises a :class:`SignatureError` subclass.
* :mod:`.signing` — making keys and signatures, on machines that have ``cryptography`` (the export
  machine, the server); imported only there.
"""

from edge_agent.crypto.trust import SignatureError, TrustedKeys, key_id

__all__ = ["SignatureError", "TrustedKeys", "key_id"]
