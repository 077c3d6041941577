"""Sample text from a ToST language model checkpoint, token by token in its recurrent form.

    python tools/generate.py runs/tost_gpt2_smoke/checkpoints --prompt "def main(" --max-new-tokens 64
    python tools/generate.py runs/tost_gpt2_smoke/checkpoints --device cuda --temperature 0.8 --top-k 50
    python tools/generate.py s3://bucket/runs/owt-base --step 20000 --storage-option endpoint_url=http://... \
        --prompt "The meaning of" --temperature 0.8 --top-k 50 --seed 1

The checkpoint store is the run's `checkpoint.url`; the newest committed step is used unless
--step names one, after its files are checked against the manifest. The model is rebuilt from
the manifest's config; each new token costs O(model width) per layer, whatever its position.
It runs on the GPU where torch finds one (--device auto), else on the CPU; --seed repeats a sample
on the same device (the CPU and a GPU draw from random streams of their own).

The prompt is encoded, and the text decoded, by the tokenizer of the run's data: the checkpoint
records it, and its files are read from the copy beside the data's shards (--storage-option
serves that URL too), checked against the recorded sha256. --tokenizer gives the same files
from elsewhere (a moved or unreachable shard set). A checkpoint of a run from before tokenizers
were recorded decodes with GPT-2. As the training documents did, the prompt starts with the
tokenizer's BOS (if it has one); the printed text is the prompt and its continuation, which ends
where the model first writes EOS.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from pretrain.checkpoint.export import open_step
from pretrain.data.storage import add_storage_option_flag, parse_storage_options
from pretrain.data.tokenizer import (
    Tokenizer,
    check_identity,
    check_same_files,
    gpt2,
    load_recorded_tokenizer,
    load_tokenizer,
)
from pretrain.errors import UserError
from pretrain.models import build_model
from pretrain.models.tost import ToSTLM


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", help="the run's checkpoint store (checkpoint.url): a path or fsspec URL")
    parser.add_argument("--step", type=int, help="a committed step (default: the newest)")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 takes the most likely token")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the model runs (default: auto, the GPU where torch finds one, else the CPU)",
    )
    parser.add_argument(
        "--tokenizer",
        help="the tokenizer's files (what tools/prepare_text.py --tokenizer took), instead of the copy beside the "
        "data; they must be the recorded ones (default: the recorded tokenizer; GPT-2 for a checkpoint without one)",
    )
    add_storage_option_flag(parser)
    args = parser.parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # libraries' chatter (DeepSpeed's) is not the text
            text = generate(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0


def generate(args: argparse.Namespace) -> str:
    device = run_device(args.device)
    storage_options = parse_storage_options(args.storage_option)
    with open_step(args.checkpoints, storage_options, args.step) as ckpt:
        model = build_model(ckpt.model_config)
        if not isinstance(model, ToSTLM):
            raise UserError(
                f"{ckpt.url} holds a {ckpt.manifest['model']} model; recurrent generation "
                f"needs a ToST language model (model.name=tost)"
            )
        model.load_state_dict(ckpt.weights())
        tokenizer = run_tokenizer(ckpt.manifest.get("tokenizer"), args.tokenizer, storage_options)
    model.to(device).eval()
    if tokenizer.vocab_size > model.vocab_size:
        raise UserError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids, more than the model's "
            f"{model.vocab_size}: it is not the run's tokenizer; pass the one its data were prepared with"
        )
    text_ids = tokenizer.encode(args.prompt)
    ids = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + text_ids
    if not ids:
        raise UserError("--prompt is empty and the tokenizer has no BOS to start from: give a --prompt")
    prompt = torch.tensor([ids], device=device)
    if prompt.shape[1] + args.max_new_tokens > model.seq_len:
        raise UserError(
            f"--max-new-tokens {args.max_new_tokens} and a {prompt.shape[1]}-token prompt exceed the "
            f"model's {model.seq_len} positions"
        )
    out = model.generate(
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        generator=torch.Generator(device).manual_seed(args.seed),
    )
    new = out[0, len(ids) :].tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return tokenizer.decode(text_ids + new)


def run_device(choice: str) -> torch.device:
    """The device --device names; auto is the GPU where torch finds one, else the CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch finds no CUDA GPU here (torch.cuda.is_available() is False); use cpu")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def run_tokenizer(record: dict | None, spec: str | None, storage_options: dict) -> Tokenizer:
    """The tokenizer a checkpoint records (`record`), or the files `spec` names checked against
    it, with its EOS and BOS; without a record (an older run), `spec`'s or GPT-2."""
    if spec is None:
        return load_recorded_tokenizer(record, storage_options) if record else gpt2()
    tokenizer = load_tokenizer(spec)
    if record:
        check_identity(record, "the checkpoint's tokenizer record")
        check_same_files(tokenizer.identity()["sha256"], tokenizer.source, record)
        tokenizer.eos_id, tokenizer.bos_id = record["eos"], record["bos"]
    return tokenizer


if __name__ == "__main__":
    sys.exit(main())
