"""fedflock's exception hierarchy.

Every error fedflock raises on purpose derives from :class:`FedflockError` and carries a
stable, machine-readable ``code`` (used in logs, telemetry and ERROR messages on the wire).
Third-party errors (onnxruntime, paho, OS errors) are translated at the boundary with
``raise X from exc`` so callers only ever need to catch these types::

    FedflockError
    ├── ConfigError              bad configuration or command-line input
    ├── ProtocolError            anything wrong with a message on the wire
    │   ├── MalformedMessage     truncated, bad magic, bad lengths, bad header
    │   ├── UnsupportedVersion   a format version this code does not speak
    │   └── ContractViolation    well-formed but not acceptable (wrong shape, unknown task, ...)
    ├── BundleError              a training bundle that cannot be used
    │   └── IntegrityError       a file's sha256 does not match the manifest (or is missing)
    ├── TrainingError            onnxruntime failed or produced non-finite values
    │   └── NonFiniteLoss        the loss became NaN/inf (a new model may deserve a rollback)
    ├── TransportError           the broker could not be reached or did not acknowledge
    ├── StorageError             the device's on-disk state could not be read or written (full disk, corrupt db)
    └── ExportError              a PyTorch model could not be turned into a bundle
"""

from __future__ import annotations


class FedflockError(Exception):
    """Base class for every error fedflock raises on purpose."""

    code = "fedflock_error"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(FedflockError):
    code = "config_error"


class ProtocolError(FedflockError):
    code = "protocol_error"


class MalformedMessage(ProtocolError):
    code = "malformed_message"


class UnsupportedVersion(ProtocolError):
    code = "unsupported_version"


class ContractViolation(ProtocolError):
    code = "contract_violation"


class BundleError(FedflockError):
    code = "bundle_error"


class IntegrityError(BundleError):
    code = "integrity_error"


class TrainingError(FedflockError):
    code = "training_error"


class NonFiniteLoss(TrainingError):
    code = "non_finite_loss"


class TransportError(FedflockError):
    code = "transport_error"


class StorageError(FedflockError):
    code = "storage_error"


class StorageFull(StorageError):
    """The disk, or the store's ``max_db_bytes``, is full; nothing committed before was lost."""

    code = "storage_full"


class ExportError(FedflockError):
    code = "export_error"


# Secure aggregation (edge_agent.secagg, issue #7). Malformed secagg bytes raise MalformedMessage and
# well-formed but unacceptable messages ContractViolation, like every other wire message.
#
#   FedflockError
#   └── SecAggError              secure aggregation failed or was refused
#       ├── SecAggAbort          the round stopped (e.g. fewer than t devices left); it reveals no input
#       ├── SecAggRefused        a client refuses a server request that would reveal too much
#       ├── SecAggTampered       an encrypted share failed authentication, or a reconstructed key is wrong
#       ├── InvalidShares        Shamir shares that cannot be used (duplicate/invalid indices, too few)
#       ├── SecAggPhaseError     an operation in the wrong protocol phase
#       └── SecAggInputError     a vector that cannot be aggregated (non-finite, wrong length, out of range)


class SecAggError(FedflockError):
    code = "secagg_error"


class SecAggAbort(SecAggError):
    code = "secagg_abort"


class SecAggRefused(SecAggError):
    code = "secagg_refused"


class SecAggTampered(SecAggError):
    code = "secagg_tampered"


class InvalidShares(SecAggError):
    code = "secagg_invalid_shares"


class SecAggPhaseError(SecAggError):
    code = "secagg_phase_error"


class SecAggInputError(SecAggError):
    code = "secagg_input_error"
