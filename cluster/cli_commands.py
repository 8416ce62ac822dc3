"""The `pagoda` subcommands ``cluster/`` adds: ``serve`` and ``status``.

``pagoda.engine.cli`` never imports ``cluster/``; the package root (``pagoda/__init__.py``) registers the
objects below in ``pagoda.engine.plugins`` by module name. Building the parser imports only
argparse-level code: Ray loads inside each command's ``main``.
"""

from __future__ import annotations

from pagoda.cluster.serve_cli import add_serve_parser, serve_main
from pagoda.cluster.status_cli import add_status_parser, status_main
from pagoda.engine.cli import CliCommand

SERVE = CliCommand(add_serve_parser, serve_main)
STATUS = CliCommand(add_status_parser, status_main)
