"""The media core every other package builds on: the timing of a session (one clock, 25
frames a second, 640 samples of 16 kHz audio a frame), the one PCM sample type and its
conversions, audio-file decoding, and the one mp4 writer.

It imports nothing from the rest of the project, so tts, avatars, models, pipeline and
server can all depend on it without an arrow running back up.
"""
