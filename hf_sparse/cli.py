"""`hf-sparse` command line: the main job, training recipes, the benchmarks, evaluation, conversion and publishing.

Every command's options are dataclass fields parsed by transformers' `HfArgumentParser` (defaults and choices in
`--help`; `--a_b` and `--a-b` both work); `hf-sparse train METHOD CONFIG.yaml [--field value ...]` runs a recipe
(`experiments/train.py`). A bad value or a missing file ends in one line on stderr and exit status 2, not a traceback
(`HF_SPARSE_TRACEBACK=1` shows it), and every value is checked before anything trains; a failed upload in
`hf-sparse push` exits with 1.
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
TRAIN_MODULE = "hf_sparse.experiments.train"  # imported by name, as the other commands' modules


def _arguments_of(command: str, module_name: str) -> tuple[type, ...]:
    if module_name == __name__:
        return LOCAL_ARGUMENTS[command]
    return importlib.import_module(module_name).ARGUMENTS


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .experiments.common import escape_help_percents

    parser = argparse.ArgumentParser(prog="hf-sparse", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    _add_train_command(commands)
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
    _describe_negative_flags(parser)
    escape_help_percents(parser)
    return parser


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    """`hf-sparse train METHOD CONFIG.yaml [--field value ...]`: the rest of the line is the recipe's to parse
    (`hf-sparse train METHOD --help` lists its fields)."""
    recipes = importlib.import_module(TRAIN_MODULE).RECIPES
    help_text = "train with a recipe: " + ", ".join(recipes) + " (CONFIG.yaml, then --field value overrides)"
    methods = "\n".join(f"  {name}: {recipe.help}" for name, recipe in recipes.items())
    train = commands.add_parser("train", help=help_text, dataclass_types=(), epilog=f"methods:\n{methods}",
                                description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("method", choices=list(recipes), help="The training method.")
    train.add_argument("recipe_arguments", nargs=argparse.REMAINDER, metavar="CONFIG.yaml [--field value ...]",
                       help="A YAML config of the recipe's fields, then flags that override it.")


def _describe_negative_flags(parser: argparse.ArgumentParser) -> None:
    """`HfArgumentParser` gives `--no_x` the help of `--x`; say what it does instead."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_parser in dict.fromkeys(action.choices.values()):
                _describe_negative_flags(sub_parser)
        elif action.option_strings and action.option_strings[0].startswith("--no_") and action.const is False:
            action.help = f"Turn off --{action.dest}."
            action.default = argparse.SUPPRESS  # the value's default is --{dest}'s (shown there), not False


def _add_positional_command(parser: argparse.ArgumentParser, kind: type) -> None:
    """Required fields as positional arguments (`hf-sparse push DIR REPO`), the others as options."""
    for item in dataclasses.fields(kind):
        if item.default is dataclasses.MISSING:
            parser.add_argument(item.name, help=item.metadata["help"])
            continue
        flags = dict.fromkeys([f"--{item.name}", f"--{item.name.replace('_', '-')}"])  # as HfArgumentParser takes
        if item.type in (bool, "bool"):
            parser.add_argument(*flags, action="store_true", help=item.metadata["help"])
        else:
            kind_of = {"float": float, "int": int}.get(str(item.type), str)
            parser.add_argument(*flags, type=kind_of, default=item.default, help=item.metadata["help"])


def _dataclasses_from(namespace: argparse.Namespace, types: tuple[type, ...]) -> list:
    values = vars(namespace)
    return [kind(**{f.name: values[f.name] for f in dataclasses.fields(kind) if f.init}) for kind in types]


def _device_count(kind: str) -> int:
    """How many devices of a torch device type this machine has (the CPU counts as one)."""
    import torch

    if kind == "cpu":
        return 1
    if kind == "mps":
        return 1 if torch.backends.mps.is_available() else 0
    backend = getattr(torch, kind, None)  # torch.cuda, torch.xpu, ...
    if backend is None or not hasattr(backend, "device_count") or not backend.is_available():
        return 0
    return backend.device_count()


def check_devices(arguments: list) -> None:
    """A `device` field must name a torch device this machine has (`cuda:7` on a one-GPU machine, `mps` without MPS
    are refused): a `ValueError` now, not a `RuntimeError` (or a failed CUDA call) after the models are built."""
    import torch

    for values in arguments:
        device = getattr(values, "device", None)
        if device is None:
            continue
        try:
            kind, index = torch.device(device).type, torch.device(device).index
        except RuntimeError:
            raise ValueError(f"`device`={device!r} is not a torch device: use cpu, cuda, cuda:N or mps.") from None
        count = _device_count(kind)
        if count == 0:
            raise ValueError(f"`device`={device!r}: no {kind} device is available here (use cpu).")
        if index is not None and index >= count:
            raise ValueError(f"`device`={device!r}: this machine has {count} {kind} device(s), {kind}:0 to "
                             f"{kind}:{count - 1}.")


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


def run_command(namespace: argparse.Namespace) -> int:
    """Run the parsed command: build its argument dataclasses (which check the values), then call it."""
    command, sub_command = namespace.command, getattr(namespace, "sub_command", None)
    if command == "train":
        importlib.import_module(TRAIN_MODULE).train(namespace.method, namespace.recipe_arguments)
        return 0
    module_name = COMMANDS[(command, sub_command)][0]
    arguments = _dataclasses_from(namespace, _arguments_of(command, module_name))
    check_devices(arguments)
    if module_name == __name__:
        return {"convert": convert, "push": push}[command](*arguments)
    importlib.import_module(module_name).main(*arguments)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:  # before `build_parser`, which imports every command's module
        from . import __version__

        print(f"hf-sparse {__version__}")
        raise SystemExit(0)  # as argparse's version action
    parser = build_parser()
    namespace = parser.parse_args(argv)
    parts = ("hf-sparse", namespace.command, getattr(namespace, "sub_command", None),
             getattr(namespace, "method", None))
    try:
        return run_command(namespace)
    except (ValueError, OSError) as error:  # bad values, missing files or folders, an unreachable Hub
        if os.environ.get("HF_SPARSE_TRACEBACK"):
            raise
        print(f"{' '.join(part for part in parts if part)}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
