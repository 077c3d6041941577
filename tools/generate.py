"""Sample text from a ToST language model checkpoint, token by token in its recurrent form.

    python tools/generate.py runs/tost_gpt2_smoke/checkpoints --prompt "def main(" --max-new-tokens 64
    python tools/generate.py s3://bucket/runs/owt-base --step 20000 --storage-option endpoint_url=http://... \
        --prompt "The meaning of" --temperature 0.8 --top-k 50 --seed 1

The checkpoint store is the run's `checkpoint.url`; the newest committed step is used unless
--step names one, after its files are checked against the manifest. The model is rebuilt from
the manifest's config; each new token costs O(model width) per layer, whatever its position.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from pretrain.checkpoint.export import open_step
from pretrain.data.storage import add_storage_option_flag, parse_storage_options
from pretrain.data.tokenizer import gpt2_tokenizer
from pretrain.errors import UserError
from pretrain.models import build_model
from pretrain.models.tost import ToSTLM


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", help="the run's checkpoint store (checkpoint.url): a path or fsspec URL")
    parser.add_argument("--step", type=int, help="a committed step (default: the newest)")
    parser.add_argument("--prompt", default="\n", help="text to continue (GPT-2 BPE)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 takes the most likely token")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0)
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
    with open_step(args.checkpoints, parse_storage_options(args.storage_option), args.step) as ckpt:
        model = build_model(ckpt.model_config)
        if not isinstance(model, ToSTLM):
            raise UserError(
                f"{ckpt.url} holds a {ckpt.manifest['model']} model; recurrent generation "
                f"needs a ToST language model (model.name=tost)"
            )
        model.load_state_dict(ckpt.weights())
    model.eval()
    tokenizer = gpt2_tokenizer()
    prompt = torch.tensor([tokenizer.encode(args.prompt, allowed_special="all")])
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
        generator=torch.Generator().manual_seed(args.seed),
    )
    return tokenizer.decode(out[0].tolist())


if __name__ == "__main__":
    sys.exit(main())
