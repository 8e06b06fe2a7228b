"""Models over the air: transfer archives, resumable download staging, the versioned model store,
and the updater that drives a rollout on the device."""

from edge_agent.ota.archive import pack_bundle, unpack_bundle
from edge_agent.ota.staging import DownloadStaging
from edge_agent.ota.store import INSTALL_STEPS, STAGES, InstalledModel, InstallReport, ModelStore
from edge_agent.ota.updater import DOWNLOAD_STAGE, ModelUpdater, UpdaterConfig

__all__ = [
    "DOWNLOAD_STAGE",
    "INSTALL_STEPS",
    "STAGES",
    "DownloadStaging",
    "InstallReport",
    "InstalledModel",
    "ModelStore",
    "ModelUpdater",
    "UpdaterConfig",
    "pack_bundle",
    "unpack_bundle",
]
