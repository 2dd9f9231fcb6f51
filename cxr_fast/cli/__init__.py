"""The `cxr-fast` command line: one module per command group (data, train, evaluate, bench, demo), joined here in
one click group. A command parses its options, builds a config and calls the module that owns the work, nothing
else; options that are settings come from `config.py` (see `options.py`), and a bad value ends with `Error: …`
naming the option, before any work starts.
"""

from __future__ import annotations

import logging
import sys

import click

from cxr_fast.cli import bench, data, demo, evaluate, train
from cxr_fast.errors import CxrFastError


class _Group(click.Group):
    """Turns a `CxrFastError` (bad input the user can fix) into 'Error: …' and exit code 2, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CxrFastError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(2)
        except OSError as error:  # a full disk, a read-only folder, a file where a folder should be, ...
            where = f": {error.filename}" if error.filename else ""
            click.echo(f"Error: {error.strerror or error}{where}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """Fast, honest training and auditing of chest X-ray classifiers.

    \b
    Workflow:  synth (or an NIH download) → shard → train → analyze → predict / export, plus eda, verify,
    preview, bench.
    The demo runs all of it on a synthetic data set:  cxr-fast demo --out outputs/demo
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")


for _module in (data, train, evaluate, bench, demo):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    cli(prog_name="cxr-fast")
