"""The server's settings from command-line flags, environment variables and a config file.

Every field of :class:`server.config.ServerConfig` (plus the few front-end settings of
:class:`Frontend`) is read the same three ways, derived from the dataclass fields and their
annotations, so a field added there is settable everywhere with no change here:

* flag ``--field-name``; a ``bool`` field also takes ``--no-field-name``; a ``list`` or
  ``dict`` field named in the plural is repeatable in the singular (``--ice-server URL``,
  ``--engine-option KEY=VALUE``; the plural works too);
* environment variable ``LIPSYNC_FIELD_NAME`` (an empty one counts as unset); a list is
  comma-separated, a dict is ``KEY=VALUE,KEY=VALUE``;
* key ``field_name`` of the config file named by ``--config FILE`` or ``LIPSYNC_CONFIG``:
  TOML (JSON when the name ends in ``.json``), lists as arrays, dicts as tables.

Precedence: flag over environment over file over the dataclass default. A dict merges key by
key in that order (``--engine-option dtype=bf16`` keeps the file's ``device``); anything else
is replaced whole. Relative paths in the file are relative to the file.

Every problem (a bad value, an unknown key, a missing file) is a :class:`SettingsError` whose
one-line message names the flag, variable or key and what it expects.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import difflib
import inspect
import io
import json
import logging
import math
import os
import re
import sys
import tokenize
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, Union, get_args, get_origin, get_type_hints
from urllib.parse import unquote_plus

if sys.version_info >= (3, 11):
    import tomllib
else:  # pyproject: tomli; python_version < '3.11'
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

from server.config import ServerConfig

ENV_PREFIX = "LIPSYNC_"
CONFIG_ENV = "LIPSYNC_CONFIG"
SECRET_WORDS = ("secret", "password", "passwd", "key", "token", "credential")
MASK = "***"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass
class Frontend:
    """Settings of ``python -m server`` that are not ``ServerConfig`` fields: read the same three
    ways, then folded into the config (``voice`` and ``musetalk_version`` become options)."""

    log_level: str = "INFO"
    voice: str | None = None  # TTS voice, the same as --tts-option voice=...
    musetalk_version: Literal["v15", "v1"] = "v15"  # MuseTalk release, the same as --engine-option version=...


# Help for the flags the server has always had; every other field's help is its comment in config.py.
HELP = {
    "data_dir": "avatars, weights and recordings",
    "avatar": "avatar a session gets unless /offer names one",
    "engine": "lip-sync engine: {engines} ('auto' takes MuseTalk where a GPU and its weights are present) or package.module:Class",
    "tts": "TTS backend: espeak (offline), edge, openai (any OpenAI-compatible /v1/audio/speech server), or piper "
           "(neural, offline: the optional [piper] extra)",
    "engine_options": "extra engine option, repeatable (musetalk: device=cuda dtype=bf16 max_batch=32 compile=true)",
    "tts_options": (
        "extra TTS backend option, repeatable (espeak: rate=175 pitch=50; edge: rate=+10% proxy=http://...; "
        "openai: base_url=http://127.0.0.1:8880/v1 model=kokoro api_key=...)"
    ),
    "voice": "TTS voice (espeak: en-us, de, fr...; edge: en-US-AriaNeural...; piper: en_US-joe-medium); GET /voices lists them",
    "ice_servers": "STUN/TURN URL for the server's peer connections, repeatable; default: none, host candidates only",
    "default_session": "sessionid 0 / absent means the oldest open session; --no-default-session for multi-user deployments",
    "log_level": "DEBUG, INFO, WARNING, ERROR or CRITICAL",
}


class SettingsError(ValueError):
    """A setting cannot be used; the message is one line naming it and what it expects."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + line; the caller exits 2
        raise SettingsError(message)


@dataclass(frozen=True)
class Setting:
    """One setting: a dataclass field and how it is spelt as flag, variable and file key."""

    name: str
    kind: str  # "scalar", "list" or "dict"
    type: Any  # scalar: str, int, float, bool, Path or a Literal; list: the item's type; dict: Any
    optional: bool  # "| None": an empty value means None
    default: Any  # dataclasses.MISSING when the field has none
    help: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> list[str]:
        """The flag, and for a repeatable one named in the plural its singular first."""
        if self.kind != "scalar" and self.name.endswith("s"):
            return ["--" + self.name[:-1].replace("_", "-"), self.flag]
        return [self.flag]

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


@dataclass
class Settings:
    """What :func:`load_settings` found: the config, the front-end settings, and where each came from."""

    config: ServerConfig
    log_level: str
    values: dict[str, Any]  # every setting by name, after the front-end ones were folded in
    sources: dict[str, str]  # every setting by name: "flag", "env", "file" or "default"
    config_file: Path | None = None

    def describe(self) -> str:
        """The effective settings, one a line, secrets masked: for the start-up log."""
        head = "settings (flag > env > file > default" + (f"; file {self.config_file}" if self.config_file else "") + "):"
        width = max(len(n) for n in self.values)
        lines = [f"  {n:<{width}} = {show(n, v)}" + (f"  [{self.sources[n]}]" if self.sources[n] != "default" else "")
                 for n, v in self.values.items()]
        return "\n".join([head, *lines])


def settings_list() -> list[Setting]:
    """Every setting: ``ServerConfig``'s fields, then the front-end ones it does not have."""
    out = _from_dataclass(ServerConfig)
    names = {s.name for s in out}
    out += [s for s in _from_dataclass(Frontend) if s.name not in names]
    return out


def _from_dataclass(cls: type) -> list[Setting]:
    hints = get_type_hints(cls)
    comments = _field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind, tp, optional = classify(hints[f.name], f"{cls.__name__}.{f.name}")
        default: Any = f.default
        factory: Any = f.default_factory
        if default is dataclasses.MISSING and factory is not dataclasses.MISSING:
            default = factory()
        out.append(Setting(f.name, kind, tp, optional, default, HELP.get(f.name) or comments.get(f.name, "")))
    return out


def classify(annotation: Any, where: str) -> tuple[str, Any, bool]:
    """(kind, type, optional) for a field's annotation; TypeError for a type no source can spell."""
    tp, optional = annotation, False
    if get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in get_args(tp) if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{where}: settings read 'X' or 'X | None', not {annotation!r}")
        tp, optional = rest[0], True
    origin = get_origin(tp)
    if _is_scalar(tp):
        return "scalar", tp, optional
    if origin is list and len(get_args(tp)) == 1 and _is_scalar(get_args(tp)[0]) and get_args(tp)[0] is not bool:
        return "list", get_args(tp)[0], optional
    if origin is dict and get_args(tp)[:1] == (str,):
        return "dict", Any, optional
    raise TypeError(f"{where}: server/settings.py cannot read a setting of type {annotation!r} yet")


def _is_scalar(tp: Any) -> bool:
    if get_origin(tp) is Literal:
        return all(isinstance(c, str) for c in get_args(tp))
    return tp in (str, int, float, bool) or (isinstance(tp, type) and issubclass(tp, Path))


def _field_comments(cls: type) -> dict[str, str]:
    """A field's comment in the class's source: the one on its line, else the block just above."""
    try:
        source = inspect.getsource(cls)
        body = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return {}
    lines = source.splitlines()
    out: dict[str, str] = {}
    for node in getattr(body, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = _trailing_comment(lines[(node.end_lineno or node.lineno) - 1])
        if not text:
            above: list[str] = []
            i = node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            text = " ".join(above)
        if text:
            out[node.target.id] = text
    return out


def _trailing_comment(line: str) -> str:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, SyntaxError):
        return ""
    return next((t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT), "")


# ---------------------------------------------------------------------------- reading values


def convert(s: Setting, raw: Any, where: str, base: Path | None = None) -> Any:
    """``raw`` (text from a flag or variable, or a value from the file) as ``s``'s type.

    ``where`` names the source in the error (``--port``, ``LIPSYNC_PORT``, ``lipsync.toml: port``);
    ``base`` is the directory relative paths are relative to (the file's), else the working one.
    """
    text = isinstance(raw, str) and base is None  # a flag or a variable
    if s.kind == "list":
        if text:
            items = [x.strip() for x in raw.split(",") if x.strip()]
        elif isinstance(raw, list):
            items = raw
        else:
            raise SettingsError(f"{where}: expected a list (an array, e.g. [\"a\", \"b\"]), got {raw!r}")
        return [_scalar(s.type, x, where, base) for x in items]
    if s.kind == "dict":
        if text:
            return parse_options(where, [x for x in raw.split(",") if x.strip()])
        if isinstance(raw, dict):
            return dict(raw)
        raise SettingsError(f"{where}: expected a table of options (KEY = VALUE), got {raw!r}")
    if s.optional and (raw is None or raw == ""):
        return None
    try:
        return _scalar(s.type, raw, where, base)
    except SettingsError:
        if is_secret(s.name):  # never echo a secret, not even a malformed one
            raise SettingsError(f"{where}: expected {_expected(s.type)}") from None
        raise


def _scalar(tp: Any, raw: Any, where: str, base: Path | None) -> Any:
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return raw.strip().lower() in TRUE_WORDS
    elif tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                pass
    elif tp is float:
        value: float | None = None
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        elif isinstance(raw, str):
            with contextlib.suppress(ValueError):
                value = float(raw.strip())
        if value is not None and math.isfinite(value):
            return value
    elif get_origin(tp) is Literal:
        if raw in get_args(tp):
            return raw
    elif isinstance(raw, str):
        if tp is str:
            return raw
        if raw.strip():  # a Path
            path = Path(raw).expanduser()
            return tp(path if base is None or path.is_absolute() else base / path)
    raise SettingsError(f"{where}: expected {_expected(tp)}, got {raw!r}")


def _expected(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, get_args(tp)))
    return {bool: "true or false (1/0, yes/no, on/off)", int: "an integer", float: "a number", str: "a string"}.get(tp, "a path")


def parse_options(where: str, items: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; integers, floats and true/false become numbers and booleans."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.strip().partition("=")
        if not sep or not key:
            raise SettingsError(f"{where} takes KEY=VALUE, got {item!r}")
        parsed: Any = value
        if value.lower() in ("true", "false"):
            parsed = value.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    parsed = kind(value)
                    break
                except ValueError:
                    pass
        out[key] = parsed
    return out


def read_file(path: Path, names: Sequence[str]) -> dict[str, Any]:
    """The config file's settings by name (``data-dir`` is ``data_dir``); unknown keys are errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"config file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"config file {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    fmt = "JSON" if path.suffix.lower() == ".json" else "TOML"
    try:
        data = json.loads(text) if fmt == "JSON" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise SettingsError(f"config file {path}: not valid {fmt}: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: expected a table of settings at the top, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise SettingsError(f"config file {path}: unknown setting '{key}'{hint}")
        out[name] = value
    return out


def build_parser(settings: Sequence[Setting] | None = None) -> argparse.ArgumentParser:
    """The command line: one flag per setting (see the module docstring), defaults left unset
    so that what was given can be told from what was not."""
    from pipeline.engines import engine_names  # the engine list for --help; imported late, it is not light

    p = _Parser(prog="python -m server", description="Real-time lip-sync avatar server (WebRTC). Every setting is a flag, "
                f"an environment variable ({ENV_PREFIX}NAME) and a key of the config file; flag > env > file > default.",
                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE", help=f"TOML (or .json) file of settings, keys as the flags' names (env {CONFIG_ENV})")
    for s in settings if settings is not None else settings_list():
        text = s.help.replace("{engines}", ", ".join(engine_names()))
        default = "" if s.default is dataclasses.MISSING or s.default in (None, [], {}) else f"; default {s.default}"
        text = f"{text} (env {s.env}{default})".strip().replace("%", "%%")
        if s.kind == "scalar" and s.type is bool:
            p.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction, help=text)
        elif s.kind == "scalar":
            p.add_argument(s.flag, dest=s.name, metavar=_metavar(s), help=text)
        else:
            p.add_argument(*s.flags, dest=s.name, action="append", metavar=_metavar(s), help=text)
    return p


def _metavar(s: Setting) -> str:
    if s.kind == "dict":
        return "KEY=VALUE"
    tp = s.type
    if tp is str and ("url" in s.name or "server" in s.name):
        return "URL"
    if get_origin(tp) is Literal:
        return "{" + ",".join(get_args(tp)) + "}"
    return {int: "N", float: "X", str: "TEXT"}.get(tp, "PATH")


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags (``argv``, default ``sys.argv[1:]``) over ``environ`` (default ``os.environ``) over the
    config file over the defaults. Raises :class:`SettingsError` with a one-line message."""
    env = os.environ if environ is None else environ
    settings = settings_list()
    by_name = {s.name: s for s in settings}
    given = vars(build_parser(settings).parse_args(argv))

    config_path: Path | None = None
    if given.get("config") or env.get(CONFIG_ENV):
        config_path = Path(given.get("config") or env[CONFIG_ENV]).expanduser().resolve()
    from_file = read_file(config_path, list(by_name)) if config_path else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    where: dict[str, str] = {}
    for s in settings:
        # Every source is read, so a bad value is an error even where a higher one overrides it.
        layers: list[tuple[str, str, Any]] = []  # (source, where, value), lowest first
        if s.name in from_file and config_path is not None:
            label = f"config file {config_path}: {s.name}"
            layers.append(("file", label, convert(s, from_file[s.name], label, config_path.parent)))
        if env.get(s.env, "").strip():
            layers.append(("env", s.env, convert(s, env[s.env], s.env)))
        if s.name in given:
            layers.append(("flag", s.flags[0], _from_flag(s, given[s.name])))
        if s.kind == "dict":  # merged key by key
            merged = dict(s.default) if isinstance(s.default, dict) else {}
            for layer in layers:
                merged.update(layer[2])
            values[s.name] = merged
        elif layers:
            values[s.name] = layers[-1][2]
        elif s.default is dataclasses.MISSING:
            raise SettingsError(f"{s.flag} (or {s.env}, or '{s.name}' in the config file) is required")
        else:
            values[s.name] = s.default
        sources[s.name], where[s.name] = (layers[-1][0], layers[-1][1]) if layers else ("default", s.flag)
        if isinstance(values[s.name], Path):
            values[s.name] = values[s.name].resolve()

    log_level = str(values.get("log_level", "INFO")).upper()
    if log_level not in LOG_LEVELS:
        raise SettingsError(f"{where['log_level']}: expected one of {', '.join(LOG_LEVELS)}, got {values['log_level']!r}")
    values["log_level"] = log_level
    _fold_frontend(values)
    fields = {f.name for f in dataclasses.fields(ServerConfig)}
    try:
        config = ServerConfig(**{k: v for k, v in values.items() if k in fields})
    except (TypeError, ValueError) as exc:  # a check of ServerConfig's own
        raise SettingsError(str(exc)) from None
    return Settings(config, log_level, values, sources, config_path)


def _from_flag(s: Setting, value: Any) -> Any:
    if s.kind == "list":
        return [_scalar(s.type, x, s.flags[0], None) for x in value]
    if s.kind == "dict":
        return parse_options(s.flags[0], value)
    if isinstance(value, bool):
        return value
    return convert(s, value, s.flag)


def _fold_frontend(values: dict[str, Any]) -> None:
    """``--musetalk-version`` and ``--voice`` are defaults of the engine's and the TTS's options:
    an explicit ``version=`` or ``voice=`` option wins, as it always has."""
    if values.get("engine") in ("musetalk", "auto") and "version" not in values.get("engine_options", {}):
        values["engine_options"] = {"version": values["musetalk_version"], **values["engine_options"]}
    if values.get("voice") and "voice" not in values.get("tts_options", {}):
        values["tts_options"] = {"voice": values["voice"], **values["tts_options"]}


# ---------------------------------------------------------------------------- showing values


def is_secret(name: str) -> bool:
    return any(word in name.lower() for word in SECRET_WORDS)


_URL_USERINFO = re.compile(r"(?<=[:/])([^/@:\s]+):([^/@\s]+)@")  # user:password@ in URLs (also turn:user:pass@host)


def show(name: str, value: Any) -> str:
    """A setting's value as the log shows it: secrets (by name, also inside option tables, and
    passwords in URLs) as ``***``; nothing secret is ever printed."""
    if value is None:
        return "(none)"
    if is_secret(name):
        return MASK
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={show(str(k), v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(name, v) for v in value) + "]"
    if isinstance(value, str):
        return _URL_USERINFO.sub(rf"\1:{MASK}@", value)
    return str(value)


def mask_query(url: str) -> str:
    """``url`` with the values of its secret-named query parameters (``?token=``, ``?secret=``) and
    any password in it masked: what an access log may print."""
    url = _URL_USERINFO.sub(rf"\1:{MASK}@", url)
    path, sep, query = url.partition("?")
    if not sep:
        return url
    parts = [p.partition("=")[0] + "=" + MASK if is_secret(unquote_plus(p.partition("=")[0])) else p for p in query.split("&")]
    return path + "?" + "&".join(parts)


def log_settings(settings: Settings, logger: logging.Logger | None = None) -> None:
    (logger or logging.getLogger("server")).info("%s", settings.describe())
