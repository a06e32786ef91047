"""MuseTalk's models and weight files: real formats, real key names, clear failures."""
from __future__ import annotations

import ast
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from models.checkpoint import CheckpointError  # noqa: E402
from models.download import DownloadError, download_weights, fetch, remote_file  # noqa: E402
from models.unet import MUSETALK_UNET_PARAMETERS, load_unet, unet_step  # noqa: E402
from models.vae import SCALING_FACTOR, decode_latents, encode_faces, load_vae  # noqa: E402
from models.weights import MissingWeights, WeightsError, WeightSpec, check_weights, models_dir, require_weights  # noqa: E402
from models.whisper import load_whisper_encoder, mel_filters  # noqa: E402
from pipeline.engines import EngineUnavailable, create_engine  # noqa: E402
from tests.support.model_size import count_parameters  # noqa: E402
from tests.support.musetalk_fixtures import TINY_WHISPER_DIMS, whisper_checkpoint, write_tiny_checkpoints  # noqa: E402
from tests.support.whisper_reference import hf_encoder_state  # noqa: E402


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("musetalk-models")
    write_tiny_checkpoints(data)
    return data


# ---- UNet -------------------------------------------------------------------------------


def test_full_size_unet_from_musetalk_json_has_849_947_844_parameters() -> None:
    assert count_parameters() == MUSETALK_UNET_PARAMETERS == 849_947_844  # built on meta: no memory


@pytest.mark.parametrize(("folder", "name"), [("musetalk", "pytorch_model.bin"), ("musetalkV15", "unet.pth")])
def test_unet_loads_from_each_release_layout_and_maps_8_channel_latents_to_4(tiny_data: Path, folder: str, name: str) -> None:
    root = models_dir(tiny_data) / folder
    unet = load_unet(root / "musetalk.json", root / name)
    with torch.inference_mode():
        out = unet_step(unet, torch.randn(2, 8, 32, 32), torch.randn(2, 50, 384))
    assert out.shape == (2, 4, 32, 32)
    assert not any(p.requires_grad for p in unet.parameters())


def test_unet_checkpoint_with_foreign_keys_is_refused_naming_them(tiny_data: Path, tmp_path: Path) -> None:
    root = models_dir(tiny_data) / "musetalkV15"
    state = torch.load(root / "unet.pth", weights_only=True)
    state["not.a.unet.key"] = torch.zeros(1)
    del state["conv_in.weight"]
    torch.save(state, tmp_path / "unet.pth")
    with pytest.raises(CheckpointError, match=r"missing \(e\.g\. conv_in\.weight\).*unexpected \(e\.g\. not\.a\.unet\.key\)"):
        load_unet(root / "musetalk.json", tmp_path / "unet.pth")


# ---- VAE --------------------------------------------------------------------------------


def test_vae_loads_safetensors_bin_and_pre_014_key_names_to_the_same_weights(tmp_path: Path) -> None:
    decoded = []
    for i, (fmt, legacy) in enumerate([("safetensors", False), ("bin", False), ("bin", True)]):
        data = tmp_path / str(i)
        write_tiny_checkpoints(data, vae_format=fmt, legacy_vae_keys=legacy, versions=())
        vae = load_vae(models_dir(data) / "sd-vae")
        with torch.inference_mode():
            decoded.append(decode_latents(vae, torch.ones(1, 4, 32, 32)))
    assert torch.equal(decoded[0], decoded[1]) and torch.equal(decoded[0], decoded[2])


def test_vae_encodes_faces_to_masked_and_whole_latents_and_decodes_256_faces(tiny_data: Path) -> None:
    vae = load_vae(models_dir(tiny_data) / "sd-vae")
    assert vae.config.scaling_factor == pytest.approx(SCALING_FACTOR)
    faces = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    with torch.inference_mode():
        latents = encode_faces(vae, faces)
        assert latents.shape == (2, 8, 32, 32)
        # the masked half differs from the whole face; the whole is scaled by 0.18215
        assert not torch.allclose(latents[:, :4], latents[:, 4:])
        x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 127.5 - 1
        assert torch.allclose(latents[:, 4:], vae.encode(x).latent_dist.mode() * SCALING_FACTOR, atol=1e-5)
        # a black lower half gives the masked latent
        blanked = faces.copy()
        blanked[:, 128:] = 0
        assert torch.allclose(encode_faces(vae, blanked)[:, 4:], latents[:, :4], atol=1e-5)
        images = decode_latents(vae, latents[:, 4:])
    assert images.shape == (2, 3, 256, 256) and images.min() >= 0 and images.max() <= 255


# ---- Whisper ----------------------------------------------------------------------------


def test_whisper_tiny_pt_matches_openai_whisper_encoder_on_its_30s_window(tiny_data: Path) -> None:
    whisper = pytest.importorskip("whisper")
    from whisper.model import ModelDimensions, Whisper

    ours = load_whisper_encoder(models_dir(tiny_data) / "whisper" / "tiny.pt")
    ckpt = torch.load(models_dir(tiny_data) / "whisper" / "tiny.pt", weights_only=True)
    theirs = Whisper(ModelDimensions(**ckpt["dims"]))
    theirs.load_state_dict(ckpt["model_state_dict"])
    pcm = np.random.default_rng(1).standard_normal(16_000).astype(np.float32) * 0.1
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(pcm))[None]
    with torch.inference_mode():
        states, normed = ours(mel)
        expected = theirs.float().encoder(mel)
    assert states.shape == (1, 1500, 5, 384)
    assert torch.allclose(normed, expected, atol=1e-4)


def test_whisper_hf_layout_loads_to_the_same_encoder(tmp_path: Path) -> None:
    ckpt = whisper_checkpoint(seed=5)
    openai_path = tmp_path / "tiny.pt"
    torch.save(ckpt, openai_path)
    hf = {f"model.encoder.{k}": v for k, v in hf_encoder_state(ckpt).items()}
    hf["model.decoder.embed_tokens.weight"] = torch.zeros(4, 384)  # ignored
    (tmp_path / "hf").mkdir()
    torch.save(hf, tmp_path / "hf" / "pytorch_model.bin")
    d = TINY_WHISPER_DIMS
    (tmp_path / "hf" / "config.json").write_text(json.dumps({
        "num_mel_bins": d["n_mels"], "max_source_positions": d["n_audio_ctx"], "d_model": d["n_audio_state"],
        "encoder_attention_heads": d["n_audio_head"], "encoder_layers": d["n_audio_layer"]}))
    a, b = load_whisper_encoder(openai_path), load_whisper_encoder(tmp_path / "hf" / "pytorch_model.bin")
    mel = torch.randn(1, 80, 100)
    with torch.inference_mode():
        assert torch.equal(a(mel)[0], b(mel)[0])


def test_whisper_other_than_tiny_is_refused(tmp_path: Path) -> None:
    ckpt = whisper_checkpoint(seed=0)
    ckpt["dims"] = {**ckpt["dims"], "n_audio_layer": 6}
    torch.save(ckpt, tmp_path / "base.pt")
    with pytest.raises(CheckpointError, match="Whisper tiny"):
        load_whisper_encoder(tmp_path / "base.pt")


def test_mel_filters_and_log_mel_match_openai_whisper() -> None:
    whisper = pytest.importorskip("whisper")
    from models.whisper import LogMelSpectrogram, normalise

    assert np.allclose(mel_filters(80), whisper.audio.mel_filters("cpu", 80).numpy(), atol=1e-7)
    pcm = whisper.pad_or_trim(np.random.default_rng(2).standard_normal(8000).astype(np.float32) * 0.1)
    ours = LogMelSpectrogram(80, torch.device("cpu"))(torch.from_numpy(pcm))
    assert torch.allclose(normalise(ours), whisper.log_mel_spectrogram(pcm), atol=1e-5)


# ---- missing and damaged weights --------------------------------------------------------


def test_missing_weights_are_listed_and_the_engine_error_names_the_download_command(tmp_path: Path) -> None:
    from pipeline.engines.musetalk import MuseTalkEngine

    problems = check_weights(tmp_path, "v15")
    assert {p.spec.key for p in problems} == {"unet-config-v15", "unet-v15", "vae-config", "vae", "whisper"}
    assert all(p.reason == "missing" for p in problems)
    with pytest.raises(MissingWeights) as missing:
        require_weights(tmp_path, "v1")
    assert isinstance(missing.value, WeightsError) and not isinstance(missing.value, EngineUnavailable)
    with pytest.raises(EngineUnavailable) as info:  # the engine says it cannot run here, with the same message
        MuseTalkEngine(tmp_path, device="cpu", version="v1")
    assert isinstance(info.value.__cause__, MissingWeights)
    assert str(info.value) == str(missing.value)
    assert "python -m models download --version v1" in str(info.value)
    assert "musetalk/pytorch_model.bin" in str(info.value)


def test_truncated_weight_file_is_corrupt_never_silently_random(tmp_path: Path) -> None:
    from pipeline.engines.musetalk import MuseTalkEngine

    write_tiny_checkpoints(tmp_path, versions=("v15",))
    unet = models_dir(tmp_path) / "musetalkV15" / "unet.pth"
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])
    (problem,) = check_weights(tmp_path, "v15")
    assert problem.reason == "corrupt" and problem.path == unet
    with pytest.raises(EngineUnavailable, match=r"corrupt.*unet\.pth.*python -m models download --version v15"):
        MuseTalkEngine(tmp_path, device="cpu")


def test_unparseable_checkpoint_of_the_right_size_is_reported_corrupt_at_load(tmp_path: Path) -> None:
    from pipeline.engines.musetalk import MuseTalkEngine

    write_tiny_checkpoints(tmp_path, versions=("v15",))
    whisper_pt = models_dir(tmp_path) / "whisper" / "tiny.pt"
    torch.save({"dims": {}, "model_state_dict": {}}, whisper_pt)  # a valid zip, the wrong content
    manifest = json.loads((models_dir(tmp_path) / "manifest.json").read_text())
    manifest["whisper/tiny.pt"]["size"] = whisper_pt.stat().st_size
    (models_dir(tmp_path) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineUnavailable, match=r"corrupt.*tiny\.pt.*python -m models download --version v15") as info:
        MuseTalkEngine(tmp_path, device="cpu")
    assert isinstance(info.value.__cause__, MissingWeights)


def test_auto_engine_uses_the_cpu_engine_when_musetalk_cannot_run(tmp_path: Path) -> None:
    engine = create_engine("auto", tmp_path)
    try:
        assert engine.name != "musetalk"
    finally:
        engine.close()


def test_auto_engine_falls_back_to_the_cpu_engine_when_weights_are_missing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_engine("auto", tmp_path, device="cpu")  # a device MuseTalk could run on, but no weights
    try:
        assert engine.name != "musetalk"
    finally:
        engine.close()
    assert "python -m models download --version v15" in caplog.text


def test_models_import_nothing_from_the_pipeline_or_the_server() -> None:
    root = Path(__file__).resolve().parent.parent / "models"
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("pipeline", "server")]
    assert found == []


# ---- the downloader ---------------------------------------------------------------------


class _Hub(http.server.BaseHTTPRequestHandler):
    """A file server with byte ranges and the hub's redirect headers."""

    files: ClassVar[dict[str, bytes]] = {}
    gets: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _resolve(self) -> str | None:
        if "/resolve/main/" in self.path:
            return "/cdn/" + self.path.split("/resolve/main/", 1)[1]
        return None

    def do_HEAD(self) -> None:
        target = self._resolve()
        if target and target in self.files:
            body = self.files[target]
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("X-Linked-Size", str(len(body)))
            self.send_header("X-Linked-ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._serve(head=True)

    def do_GET(self) -> None:
        target = self._resolve()
        if target:
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        if not head:
            self.gets.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if not head:
            self.wfile.write(body[start:])


@pytest.fixture
def hub() -> Iterator[tuple[str, dict[str, bytes], list[str]]]:
    """(base URL, path -> bytes served, paths fetched with GET)."""
    files: dict[str, bytes] = {}
    gets: list[str] = []
    handler = type("Hub", (_Hub,), {"files": files, "gets": gets})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files, gets
    finally:
        server.shutdown()
        server.server_close()


def _payload() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.arange(50_000, dtype=torch.float32)}, buf)
    return buf.getvalue()


def test_download_resumes_a_partial_file_with_a_range_request_and_verifies_sha256(hub, tmp_path: Path) -> None:
    url, files, _ = hub
    body = _payload()
    files["/cdn/tiny.pt"] = body
    dest = tmp_path / "tiny.pt"
    dest.with_name("tiny.pt.part").write_bytes(body[: len(body) // 3])  # an interrupted earlier run
    digest = fetch(url + "/cdn/tiny.pt", dest, size=len(body), sha256=hashlib.sha256(body).hexdigest(), progress=False)
    assert dest.read_bytes() == body and digest == hashlib.sha256(body).hexdigest()
    assert not dest.with_name("tiny.pt.part").exists()


def test_download_rejects_a_file_whose_hash_does_not_match(hub, tmp_path: Path) -> None:
    url, files, _ = hub
    files["/cdn/tiny.pt"] = _payload()
    with pytest.raises(DownloadError, match="SHA-256"):
        fetch(url + "/cdn/tiny.pt", tmp_path / "tiny.pt", sha256="0" * 64, progress=False)
    assert not (tmp_path / "tiny.pt").exists() and not (tmp_path / "tiny.pt.part").exists()


def test_hub_file_size_and_hash_come_from_the_lfs_redirect_headers(hub, tmp_path: Path) -> None:
    url, files, _ = hub
    body = _payload()
    files["/cdn/unet.pth"] = body
    spec = WeightSpec("x", "unet", "x/unet.pth", "test file", repo="org/repo", filename="unet.pth")
    info = remote_file(spec, endpoint=url)
    assert info.size == len(body) and info.sha256 == hashlib.sha256(body).hexdigest()
    fetch(info.url, tmp_path / "unet.pth", size=info.size, sha256=info.sha256, progress=False)
    assert (tmp_path / "unet.pth").read_bytes() == body


def test_download_fetches_through_hub_redirects_resumes_records_and_skips_what_is_there(hub, tmp_path: Path, monkeypatch) -> None:
    import models.download as download

    url, files, gets = hub
    unet = whisper = _payload()
    files["/cdn/musetalkV15/unet.pth"] = unet
    files["/cdn/tiny.pt"] = whisper
    specs = [
        WeightSpec("unet-v15", "unet", "musetalkV15/unet.pth", "unet",
                   repo="TMElyralab/MuseTalk", filename="musetalkV15/unet.pth"),
        WeightSpec("whisper", "whisper", "whisper/tiny.pt", "whisper", url=url + "/cdn/tiny.pt",
                   sha256=hashlib.sha256(whisper).hexdigest()),
    ]
    monkeypatch.setattr(download, "specs_for", lambda version, optional=(): specs)
    part = models_dir(tmp_path) / "musetalkV15" / "unet.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(unet[:1000])  # interrupted before: resumed through the hub's redirect
    download_weights(tmp_path, "v15", endpoint=url, progress=False)
    assert (models_dir(tmp_path) / "musetalkV15" / "unet.pth").read_bytes() == unet
    manifest = json.loads((models_dir(tmp_path) / "manifest.json").read_text())
    assert manifest["musetalkV15/unet.pth"]["sha256"] == hashlib.sha256(unet).hexdigest()
    fetched = len(gets)
    download_weights(tmp_path, "v15", endpoint=url, progress=False)  # all there: nothing fetched
    (models_dir(tmp_path) / "manifest.json").unlink()  # files placed by hand: checked, kept
    download_weights(tmp_path, "v15", endpoint=url, progress=False)
    assert len(gets) == fetched


def test_download_when_offline_says_what_to_do(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on: refused at once
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(DownloadError) as info:
        download_weights(tmp_path, "v15", endpoint=closed, progress=False, timeout=5)
    message = str(info.value)
    assert "offline" in message and "HF_ENDPOINT" in message
    assert "python -m models download --version v15" in message
    assert "musetalkV15/unet.pth" in message and "whisper/tiny.pt" in message


# ---- face parsing -----------------------------------------------------------------------


def test_face_parsing_loads_79999_iter_layout_and_masks_the_crop(tmp_path: Path) -> None:
    from models.face_parsing import BiSeNet, FaceParser

    torch.manual_seed(0)
    net = BiSeNet()
    state = net.state_dict()
    assert any(k.startswith("cp.resnet.layer4.1.conv2") for k in state) and "conv_out16.conv_out.weight" in state
    torch.save(state, tmp_path / "79999_iter.pth")
    parser = FaceParser(tmp_path / "79999_iter.pth")
    crop = np.random.default_rng(0).integers(0, 256, (180, 150, 3), dtype=np.uint8)
    for mode in ("jaw", "raw", "neck"):
        mask = parser(crop, mode)
        assert mask.shape == (180, 150) and mask.dtype == np.uint8
    assert parser.classes(crop).max() < 19
