"""Text-to-speech: text in, 16 kHz mono float32 PCM out, sentence by sentence."""
from tts.base import SAMPLE_RATE, TTSBackend, TTSError
from tts.registry import create_tts, tts_names
from tts.sentences import split_sentences

__all__ = ["SAMPLE_RATE", "TTSBackend", "TTSError", "create_tts", "split_sentences", "tts_names"]
