"""Server settings: every field can be set by flag, environment variable or config file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.chat import ChatConfig

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
    # Chat (POST /human type "chat"): an OpenAI-compatible chat-completions API root, e.g.
    # http://127.0.0.1:8080/v1 (llama.cpp), http://127.0.0.1:8000/v1 (vLLM), http://127.0.0.1:11434/v1 (Ollama)
    chat_base_url: str | None = None
    chat_api_key: str | None = None  # sent as Authorization: Bearer; none for most local servers
    chat_model: str = ""  # the model to ask for; empty: the server's own (llama.cpp serves the one it loaded)
    chat_system_prompt: str | None = None  # empty: a prompt for short spoken answers (server/chat.py)
    chat_max_history_turns: int = 8  # exchanges per session sent with each message (0: none)
    max_viewers: int = 8  # peers watching one session (POST /offer with "watch"); more: 429
    events_heartbeat_s: float = 15.0  # GET /events sends a comment this often, so proxies keep the stream open

    def chat_config(self) -> ChatConfig | None:
        """The chat client's configuration; None when no chat endpoint is set. ValueError
        naming the flag for a bad value (the server does not start)."""
        if not self.chat_base_url:
            return None
        from server.chat import DEFAULT_SYSTEM_PROMPT, ChatConfig  # not light: only when chat is configured

        try:
            return ChatConfig(
                base_url=self.chat_base_url,
                model=self.chat_model,
                api_key=self.chat_api_key or None,
                system_prompt=DEFAULT_SYSTEM_PROMPT if self.chat_system_prompt is None else self.chat_system_prompt,
                max_history_turns=self.chat_max_history_turns,
            )
        except ValueError as exc:  # named as the flags name them
            text = str(exc).replace("chat base_url", "--chat-base-url").replace("chat max_history_turns", "--chat-max-history-turns")
            raise ValueError(text) from None
