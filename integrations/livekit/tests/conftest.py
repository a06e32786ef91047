from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "testing"))  # the integrations' shared server fixture
from server_fixture import server  # noqa: F401 - the fixture, registered by being here
