"""MuseTalk's audio features as its two releases compute them, with the libraries they
use, written from their scripts and independent of the engine's code:

* v1.5 (``musetalk/utils/audio_processor.py``): Hugging Face's ``WhisperFeatureExtractor``
  over each 30 s segment, ``WhisperEncoder(output_hidden_states=True)``, the states trimmed
  to ``floor(seconds * 50)`` steps, 4 zero steps before and 12 after, frame ``f``'s window
  starting at step ``2f`` of that padded array;
* v1.0 (``musetalk/whisper/audio2feature.py`` and its patched ``transcribe``):
  openai-whisper's ``log_mel_spectrogram`` of the whole unpadded audio, 3000-frame slices
  each ``pad_or_trim``-ed, the encoder's embedding and block outputs, ``(end - start) // 2``
  steps kept per slice, frame ``f``'s window the steps ``2f - 4 ... 2f + 5`` clamped into range.

Both then add MuseTalk's positional encoding over the 50 rows (computed here from its
formula). The tiny random checkpoint of ``musetalk_fixtures.whisper_checkpoint`` stands in
for the real weights: the same tensors go into the reference's model and into the engine's.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

SAMPLE_RATE = 16_000
FPS = 25


def positional_encoding(rows: int = 50, d_model: int = 384) -> torch.Tensor:
    position = torch.arange(rows, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(rows, d_model)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe


_HF_NAMES = {
    "attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj",
    "attn.out": "self_attn.out_proj", "attn_ln": "self_attn_layer_norm", "mlp.0": "fc1", "mlp.2": "fc2",
    "mlp_ln": "final_layer_norm",
}


def hf_encoder_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """openai-whisper's ``encoder.*`` tensors under Hugging Face's ``WhisperEncoder`` names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in checkpoint["model_state_dict"].items():
        if not key.startswith("encoder."):
            continue
        key = key.removeprefix("encoder.")
        if key == "positional_embedding":
            key = "embed_positions.weight"
        elif key.startswith("ln_post."):
            key = "layer_norm." + key.split(".", 1)[1]
        elif key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            name, _, leaf = rest.rpartition(".")
            key = f"layers.{i}.{_HF_NAMES[name]}.{leaf}"
        out[key] = value.float()
    return out


def v15_features(pcm: npt.ArrayLike, checkpoint: dict[str, Any]) -> torch.Tensor:
    """(floor(seconds * 25), 50, 384): MuseTalk v1.5's ``get_audio_feature`` + ``get_whisper_chunk``."""
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    audio = np.asarray(pcm, np.float32).reshape(-1)
    d = checkpoint["dims"]
    config = WhisperConfig(
        num_mel_bins=d["n_mels"], max_source_positions=d["n_audio_ctx"], d_model=d["n_audio_state"],
        encoder_attention_heads=d["n_audio_head"], encoder_layers=d["n_audio_layer"], encoder_ffn_dim=4 * d["n_audio_state"],
    )
    encoder = WhisperEncoder(config)
    encoder.load_state_dict(hf_encoder_state(checkpoint), strict=False)
    encoder.eval()
    extractor = WhisperFeatureExtractor(feature_size=d["n_mels"], sampling_rate=SAMPLE_RATE)
    segment = 30 * SAMPLE_RATE
    states = []
    with torch.inference_mode():
        for start in range(0, audio.size, segment):
            features = extractor(audio[start : start + segment], return_tensors="pt", sampling_rate=SAMPLE_RATE).input_features
            hidden = encoder(features, output_hidden_states=True).hidden_states
            states.append(torch.stack(hidden, dim=2))
    whisper = torch.cat(states, dim=1)
    actual = math.floor(audio.size / SAMPLE_RATE * 50)
    whisper = whisper[:, :actual]
    whisper = torch.cat([torch.zeros_like(whisper[:, :4]), whisper, torch.zeros_like(whisper[:, :12])], dim=1)
    frames = math.floor(audio.size / SAMPLE_RATE * FPS)
    clips = [whisper[:, math.floor(f * 2) : math.floor(f * 2) + 10] for f in range(frames)]
    prompts = torch.cat(clips, dim=0).reshape(frames, 50, -1)
    return prompts + positional_encoding()


def v1_features(pcm: npt.ArrayLike, checkpoint: dict[str, Any]) -> torch.Tensor:
    """(floor(seconds * 25), 50, 384): MuseTalk v1.0's ``audio2feat`` + ``feature2chunks``."""
    import whisper as openai_whisper
    from whisper.audio import N_FRAMES, log_mel_spectrogram, pad_or_trim
    from whisper.model import ModelDimensions, Whisper

    audio = torch.from_numpy(np.asarray(pcm, np.float32).reshape(-1))
    model = Whisper(ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"])
    encoder = model.float().eval().encoder
    assert openai_whisper is not None
    mel = log_mel_spectrogram(audio)
    kept = []
    with torch.inference_mode():
        for seek in range(0, mel.shape[-1], 3000):
            end = min(seek + 3000, mel.shape[-1])
            x = pad_or_trim(mel[:, seek : seek + 3000], N_FRAMES)[None]
            x = torch.nn.functional.gelu(encoder.conv1(x))
            x = torch.nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
            x = x + encoder.positional_embedding
            states = [x]
            for block in encoder.blocks:
                x = block(x)
                states.append(x)
            embeddings = torch.stack(states, dim=2)[0]  # (1500, 5, 384)
            kept.append(embeddings[: (end - seek) // 2])
    feature_array = torch.cat(kept)
    length = feature_array.shape[0]
    frames = math.floor(audio.numel() / SAMPLE_RATE * FPS)
    out = []
    for f in range(frames):
        centre = int(f * 50 / FPS)
        idx = [min(max(i, 0), length - 1) for i in range(centre - 4, centre + 6)]
        out.append(feature_array[idx].reshape(50, -1))
    return torch.stack(out) + positional_encoding()
