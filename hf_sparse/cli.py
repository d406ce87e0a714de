"""`hf-sparse` command line: benchmarks, the demo (main job), conversion and publishing."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-sparse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="benchmarks that measure and print (never assert) speed")
    benches = bench.add_subparsers(dest="bench", required=True)
    from .bench import throughput

    throughput.add_arguments(benches.add_parser("throughput", help="images/s of HF ViT vs SparseViT variants"))

    from . import demo

    demo.add_arguments(commands.add_parser("demo", help="the main job: dense vs Tri-Level on Fashion-MNIST"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench" and args.bench == "throughput":
        from .bench import throughput

        throughput.main(args)
    elif args.command == "demo":
        from . import demo

        demo.run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
