"""A pipecat video service for the Real-Time Lip Sync server."""
from lipsync_pipecat.video import LipSyncVideoService

__all__ = ["LipSyncVideoService"]
__version__ = "0.1.0"
