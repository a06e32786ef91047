"""A session's events as server-sent events (``GET /events``): the same JSON objects the
``/humanecho`` WebSocket sends, for clients that only listen (a page, a dashboard, a back
end with no WebSocket client).

Each event is ``event: <kind>`` and ``data: <json>`` then a blank line; a comment every
``heartbeat_s`` keeps proxies from closing a quiet stream and notices a client that left.
The stream ends after the session's ``closed`` event.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web

from server.access import with_cors
from server.events import Closed, Subscription

log = logging.getLogger(__name__)

RETRY_MS = 2000  # how soon a browser's EventSource reconnects after a dropped stream


def format_event(event: dict[str, object]) -> bytes:
    """One event as SSE: its kind as the event name, its JSON (one line) as the data."""
    return f"event: {event['event']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def stream_events(request: web.Request, events: Subscription, heartbeat_s: float, closed: bool = False) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache, no-store",
        "X-Accel-Buffering": "no",  # nginx: pass each event on at once
    })
    origin = request.headers.get("Origin")
    if origin is not None:  # the access middleware allowed it; its CORS headers come too late for a stream
        with_cors(response, origin)
    try:
        await response.prepare(request)
        await response.write(f"retry: {RETRY_MS}\n: events of session {events.session_id}\n\n".encode())
        if closed:  # closed between finding it and subscribing: it will publish nothing more
            await response.write(format_event({"event": Closed.kind, "sessionid": events.session_id, "t": round(time.time(), 3)}))
            return response
        while True:
            try:
                event = await asyncio.wait_for(events.__anext__(), heartbeat_s)
            except asyncio.TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            except StopAsyncIteration:
                break
            await response.write(format_event(event))
            if event["event"] == Closed.kind:
                break
        await response.write_eof()
    except ConnectionError as exc:  # the client went away
        log.debug("event stream of session %s: client gone (%s)", events.session_id, type(exc).__name__)
    finally:
        events.close()
    return response
