"""Real-Time Lip Sync as a LiveKit avatar worker (``python -m lipsync_livekit``)."""
