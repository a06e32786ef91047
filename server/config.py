"""Server settings: every field can be set by flag, environment variable or config file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8010
    data_dir: Path = Path("data")
    avatar: str = "default"
    engine: str = "cpu"
    engine_options: dict[str, Any] = field(default_factory=dict)
    tts: str = "espeak"
    tts_options: dict[str, Any] = field(default_factory=dict)
    max_sessions: int = 8
    # sessionid 0, "0", absent or null addresses the oldest open session, as the seed's and
    # LiveTalking's clients expect; a multi-user deployment turns this off
    default_session: bool = True
    ring_slots: int = 8  # 320 ms a session may be rendered ahead
    max_upload_bytes: int = 20 * 1024 * 1024
    max_audio_seconds: float = 600.0
    max_text_chars: int = 5000
    connect_timeout_s: float = 15.0  # a session whose peer never completes ICE is closed
    worker_start_timeout_s: float = 300.0
    # Access. With a token set, every control route, the WebSocket and recordings need it
    # (Authorization: Bearer, or ?token=); a session's secret (issued by /offer) is needed
    # as well to drive, record or download that session.
    token: str | None = None
    cors_origins: list[str] = field(default_factory=list)  # browser Origins allowed besides the server's own
    # Bounds: each refusal is a clear 4xx.
    max_queued_utterances: int = 32  # per session
    max_queued_speech_s: float = 300.0  # seconds of speech queued per session, not yet shown
    max_decodes: int = 2  # audio files decoded at once (each takes a core)
    max_pending_offers: int = 4  # per client address: sessions whose peer has not connected yet
    idle_timeout_s: float = 3600.0  # a session nobody drives for this long is closed (0: never)
    max_gen_seconds: float = 600.0  # audio length /digital_human/gen takes
    job_timeout_s: float = 900.0  # an offline job still running after this is cancelled
    max_avatar_upload_bytes: int = 500 * 1024 * 1024  # a video or picture sent to POST /avatars (streamed to disk)
    max_avatar_jobs: int = 4  # avatar preparations queued or running at once (one runs at a time); more: 429
    worker_heartbeat_s: float = 5.0  # a worker silent this long is replaced
    # STUN/TURN URLs for the server's peer connections. Empty: host candidates only,
    # which is right on a LAN and avoids aiortc's default lookup of a public STUN server.
    ice_servers: list[str] = field(default_factory=list)
    web_dir: Path = WEB_DIR
