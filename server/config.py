"""Server settings, from the command line or the environment."""
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
    connect_timeout_s: float = 30.0  # a session whose peer never connects is closed
    worker_start_timeout_s: float = 300.0
    # STUN/TURN URLs for the server's peer connections. Empty: host candidates only,
    # which is right on a LAN and avoids aiortc's default lookup of a public STUN server.
    ice_servers: list[str] = field(default_factory=list)
    web_dir: Path = WEB_DIR
