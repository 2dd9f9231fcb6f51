"""The demo command."""

from __future__ import annotations

import click

from cxr_fast.cli.options import build_config, config_file_option, config_option, config_options
from cxr_fast.config import DemoConfig
from cxr_fast.pipelines.demo import run_demo


@click.command()
@config_option(DemoConfig, "out", type=click.Path(file_okay=False))
@config_option(DemoConfig, "images", type=click.Path(exists=True, file_okay=False))
@config_option(DemoConfig, "labels", type=click.Path(exists=True, dir_okay=False))
@config_options(DemoConfig, "n_images", "epochs", "seed")
@config_file_option(DemoConfig)
def demo(**settings) -> None:
    """The whole workflow end to end: data → shards → EDA → training → analysis → loader benchmark.

    On a 2-core CPU it takes a few minutes (tiny ConvNeXt at 128 px); with a GPU it trains ConvNeXt-Large at 512.
    """
    artefacts = run_demo(build_config(DemoConfig, settings))
    click.echo("\nDemo finished. Artefacts:")
    for name, path in artefacts.items():
        click.echo(f"  {name:<11} {path}")


COMMANDS = (demo,)
