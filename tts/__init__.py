"""Text-to-speech: text in, ``Pcm`` (16 kHz mono int16) out, sentence by sentence."""
from tts.base import TTSBackend, TTSError
from tts.registry import create_tts, tts_names
from tts.sentences import split_sentences

__all__ = ["TTSBackend", "TTSError", "create_tts", "split_sentences", "tts_names"]
