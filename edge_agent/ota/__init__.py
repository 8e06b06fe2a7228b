"""Models over the air: transfer archives, resumable download staging, the versioned model store."""

from edge_agent.ota.archive import pack_bundle, unpack_bundle
from edge_agent.ota.staging import DownloadStaging
from edge_agent.ota.store import INSTALL_STEPS, STAGES, InstalledModel, InstallReport, ModelStore

__all__ = [
    "INSTALL_STEPS",
    "STAGES",
    "DownloadStaging",
    "InstallReport",
    "InstalledModel",
    "ModelStore",
    "pack_bundle",
    "unpack_bundle",
]
