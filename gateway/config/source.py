"""Where the app's config comes from: the YAML file, or what gunicorn's master accepted.

Reads the file (refusing a key written twice), hands a checked config over
from gunicorn's master to its workers, and loads the app's config at start;
``parse_config`` (``load``) does the validating.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import yaml
from dotenv import dotenv_values
from flask import Flask
from flask.cli import run_command

from ..errors import ConfigError
from .load import SECRET_VARIABLE, GatewayConfig, parse_config

__all__ = [
    "environment",
    "hand_over",
    "init_app",
    "load_config",
    "read_config",
    "require",
]


_STR, _SEQ, _MAP, _MERGE = (f"tag:yaml.org,2002:{k}" for k in ("str", "seq", "map", "merge"))


# libyaml's parser when PyYAML has it (its wheels do): a 10,000-client file
# loads in a fraction of the time the pure-Python one takes.
class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """A SafeLoader that refuses a key written twice (the second would silently win).

    Plain maps, lists and strings (nearly every node of a config) are built
    directly; every other node goes through SafeLoader's own constructors.
    That halves the time a large config takes to load.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        built: dict[int, Any] = {}  # by node: an alias is built once, however often used

        def build(node: yaml.Node) -> Any:
            if node.tag == _STR and isinstance(node, yaml.ScalarNode):
                return node.value
            if id(node) in built:
                return built[id(node)]
            data: Any
            if node.tag == _MAP and isinstance(node, yaml.MappingNode):
                data = built[id(node)] = {}
                self._refuse_duplicates(node, build)
                self.flatten_mapping(node)  # merge keys (<<) first, so written keys win
                for key_node, value_node in node.value:
                    data[build(key_node)] = build(value_node)
            elif node.tag == _SEQ and isinstance(node, yaml.SequenceNode):
                data = built[id(node)] = []
                data.extend(build(item) for item in node.value)
            else:
                data = built[id(node)] = self.construct_object(node, deep=True)
            return data

        return build(node)

    @staticmethod
    def _refuse_duplicates(node: yaml.MappingNode, build: Any) -> None:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            key = build(key_node)
            try:
                duplicate = key in seen
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    "found unhashable key",
                    key_node.start_mark,
                ) from None
            if duplicate:
                # Not the key itself: under clients it may be a client key.
                raise yaml.constructor.ConstructorError(
                    None, None, "a key written twice in the same mapping", key_node.start_mark
                )
            seen.add(key)


def read_config(path: str | os.PathLike[str]) -> str:
    """Return the text of the config file at ``path``."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [
                f"{path}: file not found; copy instance/config.example.yaml to "
                "instance/config.yaml or set GATEWAY_CONFIG"
            ]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot be read ({type(exc).__name__})"]) from None


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str], text: str | None = None
) -> GatewayConfig:
    """Return the validated config in the YAML file at ``path`` (or in ``text``, read from it)."""
    path = Path(path)
    if text is None:
        text = read_config(path)
    # Loading makes hundreds of thousands of objects that all live on; each
    # collection would walk them again, which made a large file quadratic.
    collecting = gc.isenabled()
    gc.disable()
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        config = parse_config(raw, env, path.parent)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(path, exc)]) from None
    except ConfigError as exc:
        raise ConfigError([f"{path}: {p}" for p in exc.problems]) from None
    except RecursionError:
        raise ConfigError([f"{path}: is nested too deeply to be a gateway config"]) from None
    finally:
        if collecting:
            gc.enable()
    return replace(config, warnings=tuple(f"{path}: {w}" for w in config.warnings))


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    """Say where the YAML broke, and what PyYAML was reading when it did."""

    def at(mark: yaml.Mark | None) -> str:
        return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)

    problem = getattr(exc, "problem", None) or "is not valid YAML"
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    text = f"{at(getattr(exc, 'problem_mark', None))}: {problem}"
    if context:
        text += f" ({context}"
        if context_mark is not None:
            text += f" at line {context_mark.line + 1}, column {context_mark.column + 1}"
        text += ")"
    return text


# --- the hand-over from the gunicorn master ------------------------------------


def hand_over(path: str | os.PathLike[str], text: str, env: Mapping[str, str]) -> bytes:
    """Return what a worker needs to build this checked config again: the text and its variables.

    The gunicorn master keeps it for the workers it forks (gunicorn.conf.py), so
    a worker never reads the file as it is now: edited, broken or deleted since
    the master accepted it. The path only names the config and anchors its
    relative paths (TLS files), as it did for the check.
    """
    used = {var: env[var] for var in SECRET_VARIABLE.findall(text) if var in env}
    return json.dumps({"path": str(Path(path).absolute()), "text": text, "env": used}).encode()


def _handed_over(fd: int) -> GatewayConfig:
    """Build the config the gunicorn master accepted, from the file descriptor it left open."""
    try:
        bundle = json.loads(os.pread(fd, os.fstat(fd).st_size, 0))
        path, text, env = bundle["path"], bundle["text"], bundle["env"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            [f"GATEWAY_CHECKED_CONFIG_FD: file descriptor {fd} holds no config checked by gunicorn"]
        ) from None
    return load_config(path, env, text)


# --- wiring --------------------------------------------------------------------


def environment(app: Flask) -> Mapping[str, str]:
    """Return the variables secrets resolve from: ``.env`` first, the real environment wins.

    Tests pass ``GATEWAY_ENVIRON`` instead.
    """
    if app.config.get("GATEWAY_ENVIRON") is not None:
        return app.config["GATEWAY_ENVIRON"]
    env_file = app.config["GATEWAY_ENV_FILE"]
    values = {k: v for k, v in dotenv_values(env_file).items() if v is not None} if env_file else {}
    return {**values, **os.environ}


def _serving() -> bool:
    """Return whether the app is being built to serve: by a server or ``flask run``.

    Any other ``flask`` command builds the app too (``flask --help`` to list the
    commands), and most of them need no config.
    """
    context = click.get_current_context(silent=True)
    return context is None or context.command is run_command


def init_app(app: Flask) -> bool:
    """Load the config into ``app.extensions``; return whether there is one.

    Under gunicorn it is the config the master last accepted, handed over
    (``GATEWAY_CHECKED_CONFIG_FD``); otherwise the file named by ``GATEWAY_CONFIG``.
    A broken config raises ConfigError when the app is built to serve (gunicorn,
    flask run, Passenger): it fails with the problem list rather than serve a
    part of it. For any other ``flask`` command the error is kept for ``require``.
    """
    fd = app.config["GATEWAY_CHECKED_CONFIG_FD"]
    try:
        if fd is None:
            config = load_config(app.config["GATEWAY_CONFIG"], environment(app))
        else:
            config = _handed_over(int(fd))
    except ConfigError as exc:
        if _serving():
            raise
        app.extensions["gateway.config_error"] = exc
        return False
    app.extensions["gateway.config"] = config
    app.config["MAX_CONTENT_LENGTH"] = config.max_request_bytes
    return True


def require(app: Flask, command: str) -> GatewayConfig:
    """Return the app's config; for a ``command`` that needs it, say why there is none."""
    error = app.extensions.get("gateway.config_error")
    if error is None:
        return app.extensions["gateway.config"]
    problems = "\n".join(f"  {p}" for p in error.problems)
    raise click.ClickException(
        f"{command} needs the gateway config, and {app.config['GATEWAY_CONFIG']} could not be "
        f"loaded ({len(error.problems)} problem(s)):\n{problems}"
    )
