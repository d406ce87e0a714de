"""`hf-sparse` command line: the demo (main job), benchmarks, conversion and publishing."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# (command, sub-command) -> (module with add_arguments(parser) and main(args), help)
COMMANDS: dict[tuple[str, str | None], tuple[str, str]] = {
    ("demo", None): ("hf_sparse.demo", "the main job: dense vs Tri-Level SparseViT on Fashion-MNIST"),
    ("bench", "throughput"): ("hf_sparse.bench.throughput", "images/s of HF ViT vs SparseViT variants"),
    ("bench", "e2e"): ("hf_sparse.bench.e2e", "training time and accuracy: dense vs each Tri-Level level"),
    ("bench", "tost"): ("hf_sparse.bench.tost", "vanilla sparse training vs the ToST recipe, per mask method"),
    ("convert", None): ("hf_sparse.cli", "convert a local ViT/DeiT checkpoint folder to SparseViT"),
    ("push", None): ("hf_sparse.cli", "publish a local SparseViT folder to the Hub with its model card"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-sparse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for (command, sub_command), (module_name, help_text) in COMMANDS.items():
        if sub_command is None:
            sub_parser = commands.add_parser(command, help=help_text)
        else:
            if command not in groups:
                group = commands.add_parser(command, help=f"{command} commands")
                groups[command] = group.add_subparsers(dest="sub_command", required=True)
            sub_parser = groups[command].add_parser(sub_command, help=help_text)
        if module_name == __name__:
            globals()[f"add_{command}_arguments"](sub_parser)
        elif importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="folder of a ViTForImageClassification / DeiTForImageClassification")
    parser.add_argument("output_dir")
    parser.add_argument("--token_keep_ratio", type=float, default=1.0)
    parser.add_argument("--attention_keep_ratio", type=float, default=1.0)
    parser.add_argument("--token_fusion", action="store_true")


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="a folder written by save_pretrained or a Trainer")
    parser.add_argument("repo_id", help="namespace/name on the Hub")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--commit_message", default=None)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "convert":
        from .models.sparse_vit import SparseViTForImageClassification

        model = SparseViTForImageClassification.from_vit(
            args.source, token_keep_ratio=args.token_keep_ratio, attention_keep_ratio=args.attention_keep_ratio,
            token_fusion=args.token_fusion,
        )
        model.save_pretrained(args.output_dir)
        print(f"SparseViT written to {args.output_dir}")
    elif args.command == "push":
        if not os.path.isfile(os.path.join(args.directory, "config.json")):
            parser.error(f"push: {args.directory!r} is not a saved model folder (no config.json)")
        from huggingface_hub import constants
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import httpx

        from .hub import push_checkpoint

        try:
            commit = push_checkpoint(args.directory, args.repo_id, private=args.private or None,
                                     commit_message=args.commit_message)
        except (HfHubHTTPError, httpx.HTTPError) as error:
            print(
                f"hf-sparse push: publishing {args.directory!r} to {args.repo_id!r} at {constants.ENDPOINT} failed: "
                f"{type(error).__name__}: {error}\nThe local folder is unchanged; run the same command to retry.",
                file=sys.stderr,
            )
            return 1
        print(f"Pushed {args.directory} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    else:
        module_name = COMMANDS[(args.command, getattr(args, "sub_command", None))][0]
        importlib.import_module(module_name).main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
