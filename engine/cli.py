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
from pagoda.engine.config import EMBEDDED_MODEL, QUANTIZATIONS
from pagoda.engine.graph_prompt import DEFAULT_ENCODING, ENCODINGS
from pagoda.engine.request_fields import RequestField, plain_fields
from pagoda.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class CliCommand:
    """A subcommand another room adds (registered in ``pagoda.engine.plugins`` under ``CLI_COMMAND``)."""

    add_parser: Callable[[argparse._SubParsersAction], None]  # adds its parser (argparse only, no heavy imports)
    main: Callable[[argparse.Namespace], int]  # runs it; returns the exit code


def plugin_commands() -> dict[str, CliCommand]:
    """The subcommands other rooms add, by name (``serve`` and ``status`` from ``cluster/``)."""
    return {name: plugins.resolve(plugins.CLI_COMMAND, name) for name in plugins.names(plugins.CLI_COMMAND)}


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=EMBEDDED_MODEL, help="HF folder, .gguf file, Hub id, or the embedded default (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"], help="weights and activations dtype")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    g.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS),
                   help="quantize the weights at load (fp8: E4M3, CUDA compute capability >= 8.9); "
                        "FP8 checkpoints load as FP8 without it")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=128, help="running requests per step")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size on CPU, GiB")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="fp8: keys and values in E4M3, twice the blocks (CUDA)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The flags SamplingParams' field metadata names (engine/request_fields.py), each with the field's name as
    its dest (``cli_session.sampling_params_from_args``); the custom ones are added here and by _add_input_flags."""
    g = p.add_argument_group("sampling")
    for flag, f in plain_fields(SamplingParams, "cli"):
        g.add_argument(flag, dest=f.name, default=f.cli_default, **_flag_kind(flag, f))
    g.add_argument("--stop", dest="stop", action="append", default=[],
                   help="stop string; repeat for several (never shown in the output)")
    g.add_argument("--stop-token-ids", dest="stop_token_ids", type=int, nargs="*", default=[],
                   help="token ids that end generation")


def _flag_kind(flag: str, f: RequestField) -> dict:
    """A number takes a value; a bool that is off by default is a switch that turns it on."""
    if f.type is bool:
        if f.cli_default is not False:
            raise TypeError(f"{flag}: a plain CLI bool must default to False; declare it custom(...) in its metadata")
        return {"action": "store_true", "help": f.spec.help}
    if f.repeated or f.type not in (int, float, str):
        raise TypeError(f"{flag}: no plain CLI flag for {f.name}'s type; declare it custom(...) in its metadata")
    return {"type": f.type, "help": f"{f.spec.help} (default: %(default)s)"}


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
