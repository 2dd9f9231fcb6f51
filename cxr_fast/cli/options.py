"""Building click options from config fields: every option that is a setting takes its flag, default, help text and
choices from `config.py`, and a command builds its config from the values the user gave."""

from __future__ import annotations

import contextlib

import click
from click.core import ParameterSource

from cxr_fast.config import load_yaml
from cxr_fast.settings import ConfigError, describe, replace


class ConfigOption(click.Option):
    """A click option made from a config field; `config_class` and `config_path` name the field it stands for."""

    def __init__(self, *args, config_class: type, config_path: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.config_class, self.config_path = config_class, config_path


def config_option(cls: type, path: str, *decls: str, **kwargs):
    """A click option for the config field at `path` below `cls`: its flag, default, help and choices."""
    default, f = describe(cls, path)
    rule = f.metadata
    flag = rule["flag"]
    kwargs.setdefault("show_default", default is not None)
    kwargs.setdefault("help", rule["help"])
    if str(f.type) in ("bool", "bool | None"):  # a switch; an unset optional one means auto
        decls = decls or (f"{flag}/--no-{flag[2:]}",)
        if default is None:
            kwargs["show_default"] = "auto"
    elif rule["choices"] is not None:
        kwargs.setdefault("type", click.Choice([str(c) for c in rule["choices"]]))
        if all(isinstance(c, int) for c in rule["choices"]):
            kwargs.setdefault("callback", lambda _c, _p, v: None if v is None else int(v))
            default = str(default)
    elif str(f.type) == "int | str":
        kwargs.setdefault("metavar", "auto|N")
    elif "type" not in kwargs and str(f.type).endswith("| None"):
        kwargs["type"] = {"int | None": int, "float | None": float, "str | None": str}[str(f.type)]
    return click.option(*(decls or (flag,)), default=default, cls=ConfigOption, config_class=cls, config_path=path,
                        **kwargs)


def config_options(cls: type, *paths: str):
    """Decorator: config_option for each path, in the order given."""
    def decorate(command):
        for path in reversed(paths):
            command = config_option(cls, path)(command)
        return command
    return decorate


def config_file_option(cls: type):
    """--config FILE: a YAML file with any of `cls`'s settings; the flags the user types override it."""
    return click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                        help=f"YAML with any of this command's settings ({cls.__name__} in config.py); flags "
                             "override it.")


def build_config(cls: type, params: dict):
    """Every command's config: `cls` from the values of its options (each stands for a field, nested ones by their
    dotted path), or, with --config (`params["config_file"]`), the YAML file's settings with the flags the user typed
    on top; a value out of its range is a usage error naming the option."""
    ctx = click.get_current_context()
    with usage_errors():
        if params.get("config_file"):
            return replace(load_yaml(params["config_file"], cls), **typed_settings(ctx, cls))
        return replace(cls(), **typed_settings(ctx, cls, typed_only=False))


@contextlib.contextmanager
def usage_errors():
    """A ConfigError raised while a command builds its config, as click's 'Invalid value for OPTION: …'."""
    try:
        yield
    except ConfigError as error:
        raise click.BadParameter(str(error), param_hint=f"'{error.flag}'" if error.flag else None) from None


def typed_settings(ctx: click.Context, cls: type, typed_only: bool = True) -> dict:
    """Settings below `cls` that the user typed (all of its options' values with typed_only=False), as dotted config
    paths → values."""
    chosen = {}
    for param in ctx.command.params:
        if isinstance(param, ConfigOption) and param.config_class is cls and (not typed_only or \
                ctx.get_parameter_source(param.name) not in (ParameterSource.DEFAULT, None)):
            chosen[param.config_path] = ctx.params[param.name]
    return chosen
