"""Convert a trained model into files other tools load, or pretrained weights into a starting point.

    python tools/convert.py export-safetensors runs/tost_gpt2_smoke/checkpoints out/tost-safetensors
    python tools/convert.py export-safetensors s3://bucket/runs/owt-base out/owt --step 20000 --dtype bf16 \
        --max-shard-size 2GB --ema --storage-option endpoint_url=http://minio:9000
    python tools/convert.py export-hf runs/gpt2_smoke/checkpoints out/gpt2-hf
    python tools/convert.py export-hf runs/tost_gpt2_smoke/checkpoints out/tost-hf      # trust_remote_code
    python tools/convert.py export-timm runs/vit_tiny_smoke/checkpoints out/vit-timm
    python tools/convert.py export-hf runs/gpt2_smoke/checkpoints out/gpt2-hf --mlflow-run auto --register gpt2-smoke
    python tools/convert.py import-hf ~/models/gpt2 out/gpt2-init
    deepspeed pretrain/main.py +exp=gpt2 checkpoint.init_from=out/gpt2-init model.vocab_size=50257

SOURCE is a run's checkpoint store (its checkpoint.url: a path or fsspec URL): the newest
committed step, or --step N, is verified against its manifest and read, whatever engine (DeepSpeed
ZeRO 0-3, FSDP2, DDP) and number of ranks wrote it. SOURCE may also be a weights directory this
tool wrote (export-safetensors, import-hf). OUTPUT (a path or fsspec URL) appears whole or not at
all; an existing one is replaced only with --overwrite. Bad input: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from functools import partial

from pretrain.checkpoint.export import open_step
from pretrain.data.storage import add_storage_option_flag, parse_storage_options
from pretrain.errors import UserError
from pretrain.interop.hf_gpt2 import export_hf_gpt2, import_hf_gpt2
from pretrain.interop.hf_tost import export_hf_tost
from pretrain.interop.output import staged_output
from pretrain.interop.registry import add_mlflow_flags, prepare_publication, publish
from pretrain.interop.timm_vit import export_timm
from pretrain.interop.weights import DTYPES, Weights, check_fits, is_weights_dir, load_weights, parse_size, save_weights

# An export writes `weights` into a local directory, in a dtype, sharded over a size (or not).
Export = Callable[[Weights, str, str, "int | None"], None]


def exporters() -> dict[str, dict[str, Export]]:
    """Subcommand -> model family (model.name) -> export."""
    from pretrain.models import MODELS

    return {
        "export-safetensors": dict.fromkeys(MODELS, save_weights),
        "export-hf": {"gpt2": export_hf_gpt2, "tost": export_hf_tost},
        "export-timm": {"vit": export_timm},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, families in exporters().items():
        sub = commands.add_parser(name, help=f"for model.name in {{{', '.join(families)}}}")
        sub.add_argument("source", help="a checkpoint store (checkpoint.url) or a weights directory")
        sub.add_argument("output", help="the directory to write: a path or fsspec URL")
        sub.add_argument("--step", type=int, help="a committed step (default: the newest)")
        sub.add_argument("--ema", action="store_true", help="the weight average (ema.pt), not the live weights")
        sub.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="of the floating-point weights")
        sub.add_argument("--max-shard-size", help="split the weights into files of at most this size (e.g. 2GB)")
        _add_common(sub)
        add_mlflow_flags(sub)
    sub = commands.add_parser("import-hf", help="a transformers GPT-2 directory -> a weights directory to start from")
    sub.add_argument("source", help="a local directory holding a transformers GPT-2 (config.json and weights)")
    sub.add_argument("output", help="the weights directory to write (checkpoint.init_from reads it): a path or URL")
    sub.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="of the floating-point weights")
    _add_common(sub)
    args = parser.parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # libraries' chatter (DeepSpeed's) stays off stdout
            output = convert(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(output)
    return 0


def _add_common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    add_storage_option_flag(sub)


def convert(args: argparse.Namespace) -> str:
    options = parse_storage_options(args.storage_option)
    if args.command == "import-hf":
        weights = import_hf_gpt2(args.source)
        check_fits(weights, args.source)
        with staged_output(args.output, options, args.overwrite, progress=True) as directory:
            save_weights(weights, directory, args.dtype)
        return args.output
    max_shard_bytes = parse_size(args.max_shard_size) if args.max_shard_size else None
    weights = read_source(args.source, options, args.step, args.ema)
    export = exporters()[args.command].get(weights.model.name)
    if export is None:
        families = ", ".join(exporters()[args.command])
        raise UserError(
            f"{args.command} has no export for model.name={weights.model.name} (it exports {families}); "
            "use export-safetensors"
        )
    publication = prepare_publication(args, weights.provenance, options)  # before anything is written
    # Once the output is committed, it is logged and registered (from the files just committed).
    on_commit = None if publication is None else partial(publish, publication, args.output)
    with staged_output(args.output, options, args.overwrite, progress=True, on_commit=on_commit) as directory:
        export(weights, directory, args.dtype, max_shard_bytes)
    return args.output


def read_source(url: str, options: dict, step: int | None, ema: bool) -> Weights:
    """The weights of a checkpoint store's step, or of a weights directory, checked against the
    model their config builds."""
    if is_weights_dir(url, options):
        if step is not None or ema:
            raise UserError(f"{url} is a weights directory: --step and --ema apply to a checkpoint store")
        weights = load_weights(url, options)
    else:
        with open_step(url, options, step, progress=True) as ckpt:
            weights = Weights(ckpt.model_config, ckpt.weights(ema), ckpt.provenance(ema))
    check_fits(weights, url)
    return weights


if __name__ == "__main__":
    sys.exit(main())
