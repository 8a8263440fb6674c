"""The `mixlora-lit` command."""

from __future__ import annotations

import argparse
import sys


def _models_prepare(args: argparse.Namespace) -> int:
    from .base_models import ALIASES, prepare_alias

    for alias in args.aliases or sorted(ALIASES):
        print(f"{alias}: {prepare_alias(alias, force=args.force)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(base=args.base, out_dir=args.out_dir, steps=args.steps)
    return 0 if result["reload_identical"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixlora-lit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="base models available offline")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    prepare = models_sub.add_parser("prepare", help="convert an alias's GGUF to a safetensors cache (once)")
    prepare.add_argument("aliases", nargs="*", help="aliases (default: all)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if the cache looks complete")
    prepare.set_defaults(func=_models_prepare)

    demo = sub.add_parser("demo", help="inject MixLoRA into a real model, train a few steps, save and reload")
    demo.add_argument("--base", default="smollm2-135m")
    demo.add_argument("--out-dir", default="runs/demo")
    demo.add_argument("--steps", type=int, default=3)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"mixlora-lit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
