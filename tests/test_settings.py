"""Settings from flags, environment and a config file (server/settings.py): precedence, the
list and dict forms, the server's historical flags and variables, clear errors with exit
status 2, and secrets masked in the start-up log."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from server.__main__ import AccessLogger, configure
from server.config import ServerConfig
from server.settings import Setting, SettingsError, convert, load_settings, mask_query, settings_list, show
from tests.support.server_process import ServerProcess


def load(argv: list[str] | None = None, env: dict[str, str] | None = None, file: str | None = None,
         tmp: Path | None = None, name: str = "lipsync.toml") -> ServerConfig:
    return loads(argv, env, file, tmp, name).config


def loads(argv: list[str] | None = None, env: dict[str, str] | None = None, file: str | None = None,
          tmp: Path | None = None, name: str = "lipsync.toml") -> Any:
    argv = list(argv or [])
    if file is not None:
        assert tmp is not None
        path = tmp / name
        path.write_text(file)
        argv = ["--config", str(path), *argv]
    return load_settings(argv, env or {})


def test_defaults_are_the_dataclass_defaults() -> None:
    config = load()
    expected = ServerConfig()
    for f in dataclasses.fields(ServerConfig):
        value, want = getattr(config, f.name), getattr(expected, f.name)
        assert value == (want.resolve() if isinstance(want, Path) else want), f.name


# ---------------------------------------------------------------- every field, three ways


SAMPLES: dict[Any, tuple[str, Any]] = {int: ("7", 7), float: ("2.5", 2.5), str: ("x1", "x1"), Path: ("/srv/x1", Path("/srv/x1"))}


def _sample(s: Setting) -> tuple[str, Any, Any]:
    """(text for a flag or variable, the value in a file, the value expected): not the default."""
    if s.kind == "list":
        text, value = SAMPLES[s.type]
        return f"{text},{text}", [value, value] if s.type is not Path else [text, text], [value, value]
    if s.kind == "dict":
        return "k=1", {"k": 1}, {"k": 1}
    if get_origin(s.type) is Literal:
        choice = next(c for c in get_args(s.type) if c != s.default)
        return choice, choice, choice
    if s.type is bool:
        return ("0", False, False) if s.default else ("1", True, True)
    text, value = SAMPLES[s.type]
    return text, text if s.type is Path else value, value


SETTINGS = [s for s in settings_list() if s.name in {f.name for f in dataclasses.fields(ServerConfig)}]


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
@pytest.mark.parametrize("source", ["flag", "env", "file"])
def test_every_config_field_is_a_flag_a_variable_and_a_file_key(setting: Setting, source: str, tmp_path: Path) -> None:
    text, file_value, expected = _sample(setting)
    argv: list[str] = []
    env: dict[str, str] = {}
    file = None
    if source == "flag":
        if setting.kind == "scalar" and setting.type is bool:
            argv = [setting.flag if file_value else "--no-" + setting.flag[2:]]
        elif setting.kind == "list":
            argv = [x for item in text.split(",") for x in (setting.flags[0], item)]
        else:
            argv = [setting.flags[0], text]
    elif source == "env":
        env = {"LIPSYNC_" + setting.name.upper(): text}
    else:
        file = json.dumps({setting.name: file_value})
    config = load(argv, env, file, tmp_path, name="lipsync.json")
    got = getattr(config, setting.name)
    if setting.kind == "dict":
        got = {k: v for k, v in got.items() if k != "version"}  # what --musetalk-version adds for musetalk
    assert got == expected


# ---------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    ("name", "flag", "env", "file", "expected"),
    [
        ("port", ("--port", "1003"), "1002", "1001", [1003, 1002, 1001, 8010]),
        ("connect_timeout_s", ("--connect-timeout-s", "3.5"), "2.5", "1.5", [3.5, 2.5, 1.5, ServerConfig.connect_timeout_s]),
        ("default_session", ("--default-session",), "0", "false", [True, False, False, True]),
        ("token", ("--token", "from-flag"), "from-env", '"from-file"', ["from-flag", "from-env", "from-file", None]),
        ("engine", ("--engine", "musetalk"), "auto", '"x.y:Z"', ["musetalk", "auto", "x.y:Z", "cpu"]),
        ("ice_servers", ("--ice-server", "stun:flag"), "stun:env1,stun:env2", '["stun:file"]',
         [["stun:flag"], ["stun:env1", "stun:env2"], ["stun:file"], []]),
    ],
)
def test_flag_over_env_over_file_over_default(name: str, flag: tuple[str, ...], env: str, file: str, expected: list[Any],
                                              tmp_path: Path) -> None:
    var = {"LIPSYNC_" + name.upper(): env}
    toml = f"{name} = {file}\n"
    results = [loads(list(flag), var, toml, tmp_path), loads([], var, toml, tmp_path), loads([], {}, toml, tmp_path), loads([], {})]
    assert [getattr(r.config, name) for r in results] == expected
    assert [r.sources[name] for r in results] == ["flag", "env", "file", "default"]


def test_path_precedence_and_file_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "etc"
    conf.mkdir()
    assert load(file='data_dir = "d-file"\n', tmp=conf).data_dir == conf / "d-file"  # relative to the file
    assert load(["--data-dir", "d-flag"], {"LIPSYNC_DATA_DIR": "d-env"}, 'data_dir = "d-file"\n', conf).data_dir == tmp_path / "d-flag"
    assert load([], {"LIPSYNC_DATA_DIR": "d-env"}, 'data_dir = "d-file"\n', conf).data_dir == tmp_path / "d-env"
    assert load().data_dir == tmp_path / "data"


def test_an_empty_variable_counts_as_unset(tmp_path: Path) -> None:
    assert load([], {"LIPSYNC_PORT": "", "LIPSYNC_TOKEN": " "}, "port = 9001\ntoken = \"t\"\n", tmp_path).port == 9001
    assert load([], {"LIPSYNC_TOKEN": ""}, 'token = "t"\n', tmp_path).token == "t"


def test_config_file_from_the_environment_and_the_flag_wins(tmp_path: Path) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("port = 1111\n")
    b.write_text("port = 2222\n")
    assert load_settings([], {"LIPSYNC_CONFIG": str(a)}).config.port == 1111
    assert load_settings(["--config", str(b)], {"LIPSYNC_CONFIG": str(a)}).config.port == 2222
    assert load_settings(["--config", str(b)], {}).config_file == b.resolve()


# ---------------------------------------------------------------- list and dict forms


def test_list_forms(tmp_path: Path) -> None:
    assert load(["--ice-server", "stun:a", "--ice-server", "turn:b"]).ice_servers == ["stun:a", "turn:b"]
    assert load(["--ice-servers", "stun:a", "--ice-server", "turn:b"]).ice_servers == ["stun:a", "turn:b"]
    assert load([], {"LIPSYNC_ICE_SERVERS": "stun:a, turn:b,"}).ice_servers == ["stun:a", "turn:b"]
    assert load(file='ice_servers = ["stun:a", "turn:b"]\ncors_origins = ["https://x.example"]\n', tmp=tmp_path).cors_origins == [
        "https://x.example"]
    # a list is replaced whole, not merged
    assert load(["--ice-server", "stun:f"], {"LIPSYNC_ICE_SERVERS": "stun:e"}, 'ice_servers = ["stun:c"]', tmp_path).ice_servers == [
        "stun:f"]


def test_dict_forms_merge_key_by_key(tmp_path: Path) -> None:
    config = load(["--engine-option", "dtype=bf16", "--engine-option", "compile=true", "--tts-option", "rate=+10%"])
    assert config.engine_options == {"dtype": "bf16", "compile": True}
    assert config.tts_options == {"rate": "+10%"}
    assert load([], {"LIPSYNC_ENGINE_OPTIONS": "device=cuda, max_batch=8,scale=0.5"}).engine_options == {
        "device": "cuda", "max_batch": 8, "scale": 0.5}
    toml = '[engine_options]\ndevice = "cuda:1"\nmax_batch = 16\ndtype = "fp16"\n[tts_options]\npitch = 40\n'
    config = load(["--engine-option", "dtype=bf16"], {"LIPSYNC_ENGINE_OPTIONS": "max_batch=32"}, toml, tmp_path)
    assert config.engine_options == {"device": "cuda:1", "max_batch": 32, "dtype": "bf16"}
    assert config.tts_options == {"pitch": 40}


def test_version_and_voice_are_option_defaults_as_before() -> None:
    assert load(["--engine", "musetalk"]).engine_options == {"version": "v15"}
    assert load(["--engine", "auto", "--musetalk-version", "v1"]).engine_options == {"version": "v1"}
    assert load(["--engine", "cpu", "--musetalk-version", "v1"]).engine_options == {}
    assert load(["--engine", "musetalk", "--musetalk-version", "v1", "--engine-option", "version=v15"]).engine_options == {
        "version": "v15"}
    assert load(["--voice", "de"]).tts_options == {"voice": "de"}
    assert load(["--voice", "de", "--tts-option", "voice=fr"]).tts_options == {"voice": "fr"}
    assert load([], {"LIPSYNC_VOICE": "de", "LIPSYNC_MUSETALK_VERSION": "v1", "LIPSYNC_ENGINE": "musetalk"}).engine_options == {
        "version": "v1"}


# ---------------------------------------------------------------- the flags and variables the server always had


def test_historical_flags_map_as_before(tmp_path: Path) -> None:
    s = load_settings([
        "--host", "127.0.0.1", "--port", "9000", "--data-dir", str(tmp_path / "d"), "--avatar", "anna", "--engine", "musetalk",
        "--musetalk-version", "v1", "--tts", "edge", "--engine-option", "device=cuda", "--engine-option", "max_batch=32",
        "--tts-option", "rate=+10%", "--voice", "en-US-AriaNeural", "--ice-server", "stun:s:3478", "--max-sessions", "3",
        "--no-default-session", "--log-level", "debug",
    ], {})
    assert s.config == ServerConfig(
        host="127.0.0.1", port=9000, data_dir=tmp_path / "d", avatar="anna", engine="musetalk",
        engine_options={"version": "v1", "device": "cuda", "max_batch": 32}, tts="edge",
        tts_options={"voice": "en-US-AriaNeural", "rate": "+10%"}, max_sessions=3, ice_servers=["stun:s:3478"],
        default_session=False,
    )
    assert s.log_level == "DEBUG"


def test_historical_variables_map_as_before(tmp_path: Path) -> None:
    env = {
        "LIPSYNC_HOST": "127.0.0.2", "LIPSYNC_PORT": "9001", "LIPSYNC_DATA_DIR": str(tmp_path / "e"), "LIPSYNC_AVATAR": "bob",
        "LIPSYNC_ENGINE": "auto", "LIPSYNC_MUSETALK_VERSION": "v1", "LIPSYNC_TTS": "edge", "LIPSYNC_VOICE": "de",
        "LIPSYNC_ICE_SERVERS": "stun:a,turn:b", "LIPSYNC_MAX_SESSIONS": "2", "LIPSYNC_DEFAULT_SESSION": "0", "LIPSYNC_LOG_LEVEL": "WARNING",
    }
    s = load_settings([], env)
    assert s.config == ServerConfig(
        host="127.0.0.2", port=9001, data_dir=tmp_path / "e", avatar="bob", engine="auto", engine_options={"version": "v1"},
        tts="edge", tts_options={"voice": "de"}, max_sessions=2, ice_servers=["stun:a", "turn:b"], default_session=False,
    )
    assert s.log_level == "WARNING"
    for off in ("0", "false", "no"):
        assert load([], {"LIPSYNC_DEFAULT_SESSION": off}).default_session is False
    for on in ("1", "true", "yes"):
        assert load([], {"LIPSYNC_DEFAULT_SESSION": on}).default_session is True
    # a flag still beats its variable
    assert load(["--default-session"], {"LIPSYNC_DEFAULT_SESSION": "0"}).default_session is True
    assert load(["--port", "1"], {"LIPSYNC_PORT": "2"}).port == 1


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "env", "file", "words"),
    [
        (["--port", "eighty"], {}, None, "--port: expected an integer, got 'eighty'"),
        ([], {"LIPSYNC_PORT": "80.5"}, None, "LIPSYNC_PORT: expected an integer"),
        ([], {"LIPSYNC_MAX_AUDIO_SECONDS": "lots"}, None, "LIPSYNC_MAX_AUDIO_SECONDS: expected a number"),
        ([], {"LIPSYNC_DEFAULT_SESSION": "maybe"}, None, "LIPSYNC_DEFAULT_SESSION: expected true or false"),
        (["--musetalk-version", "v2"], {}, None, "--musetalk-version: expected one of v15, v1"),
        (["--log-level", "loud"], {}, None, "--log-level: expected one of DEBUG, INFO"),
        (["--engine-option", "novalue"], {}, None, "--engine-option takes KEY=VALUE, got 'novalue'"),
        ([], {"LIPSYNC_TTS_OPTIONS": "rate"}, None, "LIPSYNC_TTS_OPTIONS takes KEY=VALUE"),
        (["--prot", "1"], {}, None, "unrecognized arguments: --prot"),
        ([], {}, "prot = 1\n", "unknown setting 'prot' (did you mean 'port'?)"),
        ([], {}, "zzz = 1\n", "unknown setting 'zzz' (known: host, port"),
        ([], {}, 'port = "eighty"\n', "port: expected an integer, got 'eighty'"),
        ([], {}, "max_sessions = true\n", "max_sessions: expected an integer, got True"),
        ([], {}, 'ice_servers = "stun:a"\n', "ice_servers: expected a list"),
        ([], {}, 'engine_options = "device=cuda"\n', "engine_options: expected a table"),
        ([], {}, "port = [\n", "not valid TOML"),
        ([], {}, "[[x]]\n", "unknown setting 'x'"),
        # a bad value is an error even where a higher source overrides it
        (["--port", "1"], {}, 'port = "x"\n', "port: expected an integer"),
    ],
)
def test_bad_settings_are_one_clear_line(argv: list[str], env: dict[str, str], file: str | None, words: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as err:
        loads(argv, env, file, tmp_path)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"config file .*nope\.toml: no such file"):
        load_settings([], {"LIPSYNC_CONFIG": str(tmp_path / "nope.toml")})


def test_the_command_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for argv in (["--port", "x"], ["--config", str(tmp_path / "missing.toml")], ["--bogus"]):
        with pytest.raises(SystemExit) as exit_:
            configure(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m server: error: ") and err.count("\n") == 1, err
    monkeypatch.setenv("LIPSYNC_MAX_SESSIONS", "many")
    with pytest.raises(SystemExit) as exit_:
        configure([])
    assert exit_.value.code == 2
    assert "LIPSYNC_MAX_SESSIONS: expected an integer, got 'many'" in capsys.readouterr().err


def test_a_malformed_secret_is_not_echoed() -> None:
    s = Setting("api_key", "scalar", int, False, 0)
    with pytest.raises(SettingsError) as err:
        convert(s, "hunter2", "LIPSYNC_API_KEY")
    assert "hunter2" not in str(err.value) and "expected an integer" in str(err.value)


# ---------------------------------------------------------------- the log of the effective settings


def test_secrets_are_masked_in_the_settings_log(tmp_path: Path) -> None:
    s = loads(
        ["--token", "tok-SECRET-1", "--tts-option", "api_key=key-SECRET-2", "--ice-server", "turn:user:pw-SECRET-3@turn.example:3478"],
        {"LIPSYNC_TTS_OPTIONS": "password=pw-SECRET-4,proxy=http://u:pw-SECRET-5@proxy.example:8080"},
        '[engine_options]\nclient_secret = "sec-SECRET-6"\n', tmp_path,
    )
    text = s.describe()
    assert "SECRET" not in text, text
    assert "token" in text and "***" in text
    assert "turn:user:***@turn.example:3478" in text and "http://u:***@proxy.example:8080" in text
    lines = {line.split("=", 1)[0].strip(): line for line in text.splitlines()[1:]}
    assert set(lines) == {s.name for s in settings_list()}  # one line per setting
    assert lines["token"].split("=", 1)[1].split()[0] == "***" and "[flag]" in lines["token"]
    assert lines["port"].split("=", 1)[1].strip() == "8010"  # a default: no source tag
    assert show("token", None) == "(none)" and show("password", "") == "***"


def test_the_access_log_masks_tokens_and_secrets(caplog: pytest.LogCaptureFixture) -> None:
    assert mask_query("/ws?sessionid=ab&token=t-SECRET&x=1") == "/ws?sessionid=ab&token=***&x=1"
    assert mask_query("/record/x.mp4?secret=s-SECRET") == "/record/x.mp4?secret=***"
    assert mask_query("/human") == "/human"
    request = make_mocked_request("GET", "/ws?token=t-SECRET&sessionid=ab",
                                  headers={"Referer": "http://h:8010/webrtcapi.html?token=r-SECRET", "User-Agent": "ua"})
    with caplog.at_level(logging.INFO, logger="test.access"):
        AccessLogger(logging.getLogger("test.access"), "").log(request, web.Response(status=101), 0.25)
    assert "SECRET" not in caplog.text
    assert '"GET /ws?token=***&sessionid=ab HTTP/1.1" 101' in caplog.text and "webrtcapi.html?token=***" in caplog.text


def test_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        load_settings(["--help"], {})
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for s in settings_list():
        assert s.flags[0] in out and s.env in out, s.name


@pytest.mark.slow
def test_the_server_logs_its_settings_once_with_the_token_masked(make_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    conf = tmp_path / "lipsync.toml"
    conf.write_text('token = "e2e-SECRET-token"\nmax_sessions = 5\n')
    srv = make_server("--config", str(conf))
    with urllib.request.urlopen(srv.url + "/digital_human/check?token=e2e-SECRET-token", timeout=10) as r:
        assert r.status == 200
    log = ""
    for _ in range(50):  # the access line is written once the response is sent
        log = srv.log_path.read_text(errors="replace")
        if "check?token=***" in log:
            break
        time.sleep(0.1)
    assert "GET /digital_human/check?token=*** HTTP/1.1" in log, log[-3000:]
    assert "e2e-SECRET-token" not in log
    assert log.count("settings (flag > env > file > default") == 1
    assert re.search(r"\n  token +=  ?\*\*\*  \[file\]\n", log), log[-3000:]
    assert re.search(r"\n  max_sessions += 5  \[file\]\n", log)
