"""What the running server holds, in one object on the aiohttp app (no module globals)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from avatars.avatar import Avatar, check_name, load_avatar
from pipeline.client import WorkerClient
from server.config import ServerConfig
from server.sessions import SessionManager
from tts.base import TTSBackend


@dataclass
class AppState:
    config: ServerConfig
    tts: TTSBackend
    sessions: SessionManager
    worker: WorkerClient
    avatars: dict[str, Avatar] = field(default_factory=dict)
    recordings: dict[str, Path] = field(default_factory=dict)

    @property
    def recordings_dir(self) -> Path:
        return Path(self.config.data_dir) / "recordings"

    def avatar(self, name: str) -> Avatar:
        check_name(name)
        if name not in self.avatars:
            self.avatars[name] = load_avatar(self.config.data_dir, name)
        return self.avatars[name]
