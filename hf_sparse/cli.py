"""`hf-sparse` command line: the main job, the benchmarks, conversion and publishing.

Every command's options are dataclass fields parsed by transformers' `HfArgumentParser` (defaults and choices in
`--help`); a bad value or a missing file ends in one line on stderr and exit status 2, not a traceback
(`HF_SPARSE_TRACEBACK=1` shows it); a failed upload in `hf-sparse push` exits with 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser


@dataclass
class ConvertArguments:
    source: str = field(metadata={"help": "A ViTForImageClassification / DeiTForImageClassification: a local folder "
                                  "or a Hub id."})
    output_dir: str = field(metadata={"help": "Where the SparseViT folder is written."})
    token_keep_ratio: float = field(default=1.0, metadata={"help": "Fraction of patch tokens kept (1.0: off)."})
    attention_keep_ratio: float = field(default=1.0, metadata={"help": "Fraction of keys kept (1.0: off)."})
    token_fusion: bool = field(default=False, metadata={"help": "Fuse the dropped tokens into one (EViT)."})


@dataclass
class PushArguments:
    directory: str = field(metadata={"help": "A folder written by save_pretrained or a Trainer."})
    repo_id: str = field(metadata={"help": "namespace/name on the Hub."})
    private: bool = field(default=False, metadata={"help": "Create the repo private."})
    commit_message: str | None = field(default=None, metadata={"help": "The commit's message."})


# (command, sub-command) -> (module with ARGUMENTS and main(*arguments), help)
COMMANDS: dict[tuple[str, str | None], tuple[str, str]] = {
    ("demo", None): ("hf_sparse.experiments.demo", "the main job: dense vs Tri-Level SparseViT on Fashion-MNIST"),
    ("bench", "throughput"): ("hf_sparse.experiments.bench_throughput", "images/s of HF ViT vs SparseViT variants"),
    ("bench", "e2e"): ("hf_sparse.experiments.bench_e2e", "training time and accuracy: dense vs Tri-Level"),
    ("bench", "gpu"): ("hf_sparse.experiments.bench_gpu", "HF ViT vs SparseViT on a GPU: bf16, eager and compiled"),
    ("bench", "tost"): ("hf_sparse.experiments.bench_tost", "vanilla sparse training vs the ToST recipe, per mask"),
    ("evaluate", None): ("hf_sparse.experiments.evaluation", "accuracy and inference throughput of saved models"),
    ("convert", None): ("hf_sparse.cli", "convert a ViT/DeiT checkpoint to SparseViT"),
    ("push", None): ("hf_sparse.cli", "publish a local model folder to the Hub with its model card"),
}
LOCAL_ARGUMENTS = {"convert": (ConvertArguments,), "push": (PushArguments,)}


def _arguments_of(command: str, module_name: str) -> tuple[type, ...]:
    if module_name == __name__:
        return LOCAL_ARGUMENTS[command]
    return importlib.import_module(module_name).ARGUMENTS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-sparse", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for (command, sub_command), (module_name, help_text) in COMMANDS.items():
        types = _arguments_of(command, module_name)
        if module_name == __name__:
            _add_positional_command(commands.add_parser(command, help=help_text, description=help_text,
                                                        dataclass_types=()), types[0])
            continue
        if sub_command is None:
            commands.add_parser(command, help=help_text, description=help_text, dataclass_types=types)
            continue
        if command not in groups:
            group = commands.add_parser(command, help=f"{command} commands", dataclass_types=())
            groups[command] = group.add_subparsers(dest="sub_command", required=True, parser_class=HfArgumentParser)
        groups[command].add_parser(sub_command, help=help_text, description=help_text, dataclass_types=types)
    return parser


def _add_positional_command(parser: argparse.ArgumentParser, kind: type) -> None:
    """Required fields as positional arguments (`hf-sparse push DIR REPO`), the others as options."""
    for item in dataclasses.fields(kind):
        if item.default is dataclasses.MISSING:
            parser.add_argument(item.name, help=item.metadata["help"])
        elif item.type in (bool, "bool"):
            parser.add_argument(f"--{item.name}", action="store_true", help=item.metadata["help"])
        else:
            kind_of = {"float": float, "int": int}.get(str(item.type), str)
            parser.add_argument(f"--{item.name}", type=kind_of, default=item.default, help=item.metadata["help"])


def _dataclasses_from(namespace: argparse.Namespace, types: tuple[type, ...]) -> list:
    values = vars(namespace)
    return [kind(**{f.name: values[f.name] for f in dataclasses.fields(kind) if f.init}) for kind in types]


def convert(args: ConvertArguments) -> int:
    from .models.sparse_vit import SparseViTForImageClassification

    model = SparseViTForImageClassification.from_vit(
        args.source, token_keep_ratio=args.token_keep_ratio, attention_keep_ratio=args.attention_keep_ratio,
        token_fusion=args.token_fusion,
    )
    model.save_pretrained(args.output_dir)
    try:  # the source's preprocessing travels with it
        from transformers import AutoImageProcessor

        AutoImageProcessor.from_pretrained(args.source).save_pretrained(args.output_dir)
    except OSError:
        print(f"{args.source} has no image processor config: none written.", file=sys.stderr)
    print(f"SparseViT written to {args.output_dir}")
    return 0


def push(args: PushArguments) -> int:
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
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    command, sub_command = namespace.command, getattr(namespace, "sub_command", None)
    module_name = COMMANDS[(command, sub_command)][0]
    name = " ".join(part for part in ("hf-sparse", command, sub_command) if part)
    try:
        arguments = _dataclasses_from(namespace, _arguments_of(command, module_name))
        if module_name == __name__:
            return {"convert": convert, "push": push}[command](*arguments)
        importlib.import_module(module_name).main(*arguments)
    except (ValueError, OSError) as error:  # bad values, missing files or folders, an unreachable Hub
        if os.environ.get("HF_SPARSE_TRACEBACK"):
            raise
        print(f"{name}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
