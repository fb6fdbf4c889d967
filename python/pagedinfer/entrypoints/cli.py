"""The `pagedinfer` command: `pagedinfer serve [MODEL] [flags]`, as `vllm serve`."""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedinfer", description="pagedinfer: LLM inference.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the OpenAI-compatible server",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="the model to serve (as --model; none: the embedded SmolLM2-135M-Instruct)")
    try:  # the server's dependencies are an extra: say how to get them
        from pagedinfer.entrypoints.openai.api_server import make_parser, run_server
    except ImportError as error:
        sys.exit(f"pagedinfer serve needs the serve extra ({error.name} is missing): "
                 f"pip install 'pagedinfer[serve]'")
    make_parser(serve)
    args = parser.parse_args(argv)
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            parser.error(f"MODEL {args.model_tag!r} and --model {args.model!r} disagree")
        args.model = args.model_tag
    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
