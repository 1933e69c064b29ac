"""Settings of a long-running command (``shardstore serve``) from flags, the environment and a config file.

Every option of a command that opts in (:func:`make_configurable`) is a setting
with one name spelled three ways, derived from its long flag so that an option
added later gets its environment and file forms for free::

    flag --cache-size    environment SHARDSTORE_SERVE_CACHE_SIZE    file key cache_size

Precedence: flag > environment > config file > built-in default. The config
file is ``--config FILE`` or ``$SHARDSTORE_SERVE_CONFIG``: TOML (``.toml``) or
YAML (``.yaml``/``.yml``), one flat table of keys.

Decisions:

* The environment names carry the command (``SHARDSTORE_SERVE_``): the
  environment is shared by every command, and ``SHARDSTORE_CACHE_SIZE`` already
  bounds the *client's* disk cache; a server must not read it as the size of
  its memory cache.
* Which options were given on the command line cannot be told from their
  values (``--port 50051`` equals the default), so the parser's defaults are
  replaced by :class:`Unset` markers that only a flag overwrites; :func:`resolve`
  then fills the rest from the environment, the file and the real defaults.
* A repeatable option (``--storage-option``) adds up: file items, then
  environment items, then flags; for ``KEY=VALUE`` items the last one wins.
* ``--json`` and ``--quiet`` say how this invocation prints, not how the server
  behaves, and are read before settings are resolved: they stay flags only.
* An unknown key in the file is an error (a typo must not silently fall back
  to a default); unknown ``SHARDSTORE_SERVE_*`` variables cannot be told from
  other programs' and are ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardstore.errors import InvalidInputError
from shardstore.textfile import read_user_text

ENV_PREFIX = "SHARDSTORE_"
CONFIG_FLAG = "--config"
# Options that are not settings: argparse's own, and how this one invocation prints.
_NOT_SETTINGS = frozenset({"help", "json", "quiet", "config"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_SETTINGS_ATTR = "_configurable"
_RESOLVED_ATTR = "_configurable_resolved"


class Unset:
    """Stands in a parsed namespace for an option no flag gave; holds the option's real default."""

    def __init__(self, default: Any) -> None:
        self.default = default

    def __repr__(self) -> str:
        return f"Unset({self.default!r})"


@dataclass(frozen=True)
class Setting:
    """One setting: its three names, and the argparse option that parses its values."""

    flag: str
    env: str
    key: str
    action: argparse.Action
    default: Any

    @property
    def dest(self) -> str:
        return self.action.dest

    @property
    def repeatable(self) -> bool:
        return isinstance(self.action, argparse._AppendAction)

    @property
    def is_switch(self) -> bool:
        """A flag without a value (``store_true``): its env and file forms are booleans."""
        return self.action.nargs == 0


@dataclass(frozen=True)
class ConfigurableCommand:
    """The settings table of one command; kept in the parsed namespace so that :func:`resolve` finds it."""

    command: str
    settings: tuple[Setting, ...]

    @property
    def config_env(self) -> str:
        return env_name(self.command, CONFIG_FLAG)

    def by_key(self) -> dict[str, Setting]:
        return {setting.key: setting for setting in self.settings}


def env_name(command: str, flag: str) -> str:
    return f"{ENV_PREFIX}{command}_{flag.lstrip('-')}".replace("-", "_").upper()


def file_key(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _long_flag(action: argparse.Action) -> str | None:
    return next((option for option in action.option_strings if option.startswith("--")), None)


def make_configurable(parser: argparse.ArgumentParser, command: str) -> ConfigurableCommand:
    """Add ``--config`` and make every option of ``parser`` a setting. Call after the last ``add_argument``."""
    parser.add_argument(CONFIG_FLAG, metavar="FILE", default=None,
                        help=f"settings file, TOML or YAML (default ${env_name(command, CONFIG_FLAG)}); "
                             f"every --flag-name is also key flag_name there and {env_name(command, '--flag-name')}")
    settings = []
    for action in parser._actions:
        flag = _long_flag(action)
        if flag is None or action.dest in _NOT_SETTINGS:
            continue
        settings.append(Setting(flag, env_name(command, flag), file_key(flag), action, action.default))
        if not isinstance(action, argparse._AppendAction):
            # Append actions copy and extend their default; they keep a real list and add up instead.
            action.default = Unset(action.default)
    table = ConfigurableCommand(command, tuple(settings))
    parser.set_defaults(**{_SETTINGS_ATTR: table})
    return table


def settings_of(args: argparse.Namespace) -> ConfigurableCommand | None:
    table = getattr(args, _SETTINGS_ATTR, None)
    return table if isinstance(table, ConfigurableCommand) else None


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> None:
    """Fill every option no flag gave from the environment, then the config file, then its default.

    A no-op for commands that are not configurable, and when called twice.
    """
    table = settings_of(args)
    if table is None or getattr(args, _RESOLVED_ATTR, False):
        return
    environ = os.environ if environ is None else environ
    config_path: str | None = args.config or environ.get(table.config_env) or None
    from_file = load_config_file(Path(config_path), table) if config_path else {}
    source = str(config_path)
    for setting in table.settings:
        current = getattr(args, setting.dest)
        # Empty counts as unset: compose's ${VAR:-} and templated manifests produce empty variables.
        env_text = environ.get(setting.env) or None
        if setting.repeatable:
            items: list[Any] = []
            if setting.key in from_file:
                items += _items_from_file(from_file[setting.key], setting, source)
            if env_text:
                items += [_convert(item, setting, f"${setting.env}") for item in shlex.split(env_text)]
            setattr(args, setting.dest, items + list(current or []))  # flag items last: they win
            continue
        if not isinstance(current, Unset):
            continue
        if env_text is not None:
            value = _convert(env_text, setting, f"${setting.env}")
        elif setting.key in from_file:
            value = _from_file(from_file[setting.key], setting, source)
        else:
            value = current.default
        setattr(args, setting.dest, value)
    args.config = config_path
    setattr(args, _RESOLVED_ATTR, True)


def load_config_file(path: Path, table: ConfigurableCommand) -> dict[str, Any]:
    """The file's keys, checked against the settings table: unknown keys are errors."""
    text = read_user_text(path, "config file")
    suffix = path.suffix.lower()
    data: Any
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInputError(f"config file {path}: {_one_line(exc)}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"config file {path}: {_one_line(exc)}") from None
    else:
        raise InvalidInputError(f"config file {path}: name it .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise InvalidInputError(f"config file {path}: expected a table of settings, not {type(data).__name__}")
    known = table.by_key()
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InvalidInputError(f"config file {path}: unknown setting {unknown[0]!r} "
                                f"(known: {', '.join(sorted(known))})")
    return data


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _from_file(value: Any, setting: Setting, path: str) -> Any:
    where = f"{path}: {setting.key}"
    if isinstance(value, dict | list):
        raise InvalidInputError(f"{where}: expected one value, not a {type(value).__name__}")
    if isinstance(value, bool) and not setting.is_switch:
        raise InvalidInputError(f"{where}: expected a value, not {str(value).lower()}")
    return _convert(str(value).lower() if isinstance(value, bool) else str(value), setting, where)


def _items_from_file(value: Any, setting: Setting, path: str) -> list[Any]:
    """A list of items, or a table for ``KEY=VALUE`` options (``storage_option = {endpoint_url = "..."}``)."""
    where = f"{path}: {setting.key}"
    if isinstance(value, dict):
        texts = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items()]
    elif isinstance(value, list):
        texts = [item if isinstance(item, str) else json.dumps(item) for item in value]
    else:
        texts = [str(value)]
    return [_convert(text, setting, where) for text in texts]


def _convert(text: str, setting: Setting, where: str) -> Any:
    """Parse ``text`` exactly as the flag would be parsed; errors name where the value came from."""
    action = setting.action
    if setting.is_switch:
        lowered = text.strip().lower()
        if lowered not in _TRUE | _FALSE:
            raise InvalidInputError(f"{where}: expected true or false, not {text!r}")
        return action.const if lowered in _TRUE else setting.default
    convert = action.type if callable(action.type) else str
    try:
        value = convert(text)
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where}: {_one_line(exc) or f'invalid value {text!r}'}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise InvalidInputError(f"{where}: {text!r} is not one of {choices}")
    return value
