"""`pagoda` command line: generate and chat on one engine, tokens streamed to the terminal; serve
the cluster application.

    pagoda generate "What is the capital of France?"
    pagoda generate --graph graph.json --json-schema answer.schema.json "Which drugs interact?"
    pagoda chat
    pagoda serve --config deploy/pagoda.yaml      (Ray is imported only by this one)
    pagoda status                                 (replicas, KV usage, queues of the running application)

``serve`` and ``status`` belong to ``cluster/``, which the engine never imports: the package root
(``pagoda/__init__.py``) registers them in ``pagoda.engine.plugins`` as ``CliCommand`` objects named by
module, and this module finds them there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from pagoda.engine import cli_inputs, plugins
from pagoda.engine.config import EMBEDDED_MODEL
from pagoda.engine.graph_prompt import DEFAULT_ENCODING, ENCODINGS


@dataclass(frozen=True)
class CliCommand:
    """A subcommand another room adds (registered in ``pagoda.engine.plugins`` under ``CLI_COMMAND``)."""

    add_parser: Callable[[argparse._SubParsersAction], None]  # adds its parser (argparse only, no heavy imports)
    main: Callable[[argparse.Namespace], int]  # runs it; returns the exit code


def plugin_commands() -> dict[str, CliCommand]:
    """The subcommands other rooms add, by name (``serve`` and ``status`` from ``cluster/``)."""
    return {name: plugins.resolve(plugins.CLI_COMMAND, name) for name in plugins.names(plugins.CLI_COMMAND)}


_SAMPLING_FLAGS = [  # (flag, type, default, help)
    ("--temperature", float, 0.0, "sampling temperature; 0 is greedy (default: %(default)s)"),
    ("--top-p", float, 1.0, "nucleus sampling mass, in (0, 1] (default: %(default)s)"),
    ("--top-k", int, -1, "keep the k most likely tokens; -1 disables (default: %(default)s)"),
    ("--min-p", float, 0.0, "drop tokens below min_p x p(most likely), in [0, 1] (default: %(default)s)"),
    ("--repetition-penalty", float, 1.0, "> 1 discourages tokens already in prompt or output (default: %(default)s)"),
    ("--presence-penalty", float, 0.0, "in [-2, 2], subtracted once per token present in the output (default: %(default)s)"),
    ("--frequency-penalty", float, 0.0, "in [-2, 2], subtracted per occurrence in the output (default: %(default)s)"),
    ("--seed", int, None, "per-request seed for reproducible sampling (default: none)"),
    ("--max-tokens", int, 256, "output tokens at most (default: %(default)s)"),
    ("--min-tokens", int, 0, "generate at least this many tokens before EOS may end it (default: %(default)s)"),
]


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=EMBEDDED_MODEL, help="HF folder, .gguf file, Hub id, or the embedded default (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"], help="weights and activations dtype")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=128, help="running requests per step")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size on CPU, GiB")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    for flag, typ, default, help_text in _SAMPLING_FLAGS:
        g.add_argument(flag, type=typ, default=default, help=help_text)
    g.add_argument("--stop", action="append", default=[], help="stop string; repeat for several (never shown in the output)")
    g.add_argument("--stop-token-ids", type=int, nargs="*", default=[], help="token ids that end generation")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")


def _add_input_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("graph and structured output")
    g.add_argument("--graph", type=cli_inputs.graph_file, metavar="FILE",
                   help="a graph (JSON: nodes, edges; see engine/graph_prompt.py) written as text before the "
                        "first user message")
    g.add_argument("--graph-encoding", choices=sorted(ENCODINGS), default=None,
                   help=f"how to write the graph (default: {DEFAULT_ENCODING})")
    one = g.add_mutually_exclusive_group()
    one.add_argument("--json-schema", dest="structured", type=cli_inputs.json_schema_file, metavar="FILE",
                     help="the output is compact JSON (one line) that this JSON schema file admits")
    one.add_argument("--regex", dest="structured", type=cli_inputs.regex, metavar="REGEX",
                     help="the whole output matches this regular expression")
    one.add_argument("--grammar", dest="structured", type=cli_inputs.grammar, metavar="NAME|FILE",
                     help="the output follows a registered grammar (autoglm-action) or an EBNF file (root rule root)")


def _check_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot express; exits like argparse (status 2) naming the flag."""
    if getattr(args, "graph_encoding", None) is not None and args.graph is None:
        parser.error("argument --graph-encoding: needs --graph")
    if getattr(args, "graph", None) is not None and getattr(args, "raw", False):
        parser.error("argument --graph: not with --raw (the graph goes before the first user message, "
                     "which a raw prompt does not have)")


def build_parser(commands: dict[str, CliCommand] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="pagoda: paged-KV LLM engine and serving cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer one prompt, streaming tokens")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--raw", action="store_true", help="plain completion: do not wrap the prompt in the chat template")
    chat = sub.add_parser("chat", help="interactive multi-turn chat")
    chat.add_argument("--system", default=None, help="system message")
    for p in (gen, chat):
        _add_engine_flags(p)
        _add_sampling_flags(p)
        _add_input_flags(p)
    for command in (plugin_commands() if commands is None else commands).values():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    commands = plugin_commands()
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    if args.command in commands:
        return commands[args.command].main(args)
    _check_inputs(parser, args)
    from pagoda.engine.cli_session import CliSession  # heavy imports only after --help

    try:
        session = CliSession(args)
        return session.generate(args.prompt, raw=args.raw) if args.command == "generate" else session.chat(args.system)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
