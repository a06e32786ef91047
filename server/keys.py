"""Typed keys for what the aiohttp application holds (no module globals)."""
from __future__ import annotations

from aiohttp import web

from server.config import ServerConfig
from server.manager import SessionManager

CONFIG = web.AppKey("config", ServerConfig)
MANAGER = web.AppKey("manager", SessionManager)
