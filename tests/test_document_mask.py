"""Document masking (data.document_mask): with `document_ids`, no token of a block sees an earlier
document of it, in softmax attention and in causal TSSA, in each model.tssa_impl and in the
recurrent form, while the loss still covers every token."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import config, global_batches, rank_micro_batches

from pretrain.batch import document_ids
from pretrain.config import ModelConfig
from pretrain.distributed import mean_over_ranks
from pretrain.engines import build_engine
from pretrain.launch import run_local_world
from pretrain.models import build_model
from pretrain.models.tost import statistics_impl
from pretrain.models.tssa import document_cumsum, document_positions, token_statistics

EOS, VOCAB = 0, 50
IMPLS = ("eager", "fused", "triton")  # triton: in Triton's interpreter on CPU (tests/conftest.py)


def model(name: str, impl: str = "eager", seed: int = 0) -> torch.nn.Module:
    """A tiny LM whose TSSA branches matter (temp and denom_bias away from their inits)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(name=name, n_layer=2, n_head=2, n_embd=16, seq_len=24, vocab_size=VOCAB, tssa_impl=impl)
    lm = build_model(cfg).double().eval()
    with torch.no_grad():
        for block in lm.blocks:
            if name == "tost":
                block.attn.temp.uniform_(0.5, 2.0)
                block.attn.denom_bias.normal_(0, 0.5)
    return lm


def test_document_ids_count_the_eos_tokens_before_each_token() -> None:
    ids = torch.tensor([[5, EOS, 3, 4, EOS, EOS, 7], [EOS, 1, 2, 3, 4, 5, EOS]])
    assert document_ids(ids, EOS).tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    assert document_positions(document_ids(ids, EOS)).tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 5]]


def test_document_cumsum_restarts_at_each_document() -> None:
    x = torch.arange(1.0, 8.0).view(1, 1, 7)
    ids = torch.tensor([[0, 0, 1, 1, 1, 2, 3]])
    assert document_cumsum(x, ids).flatten().tolist() == [1, 3, 3, 7, 12, 6, 7]


def two_documents(T: int = 20, first: int = 7, seed: int = 0) -> torch.Tensor:
    """Token ids (2, T): a first document of `first` tokens (ending with EOS) then a second one;
    the second row's first document is one token shorter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, T), generator=g)
    ids[0, first - 1], ids[1, first - 2] = EOS, EOS
    return ids


@pytest.mark.parametrize(
    "name, impl",
    [
        ("gpt2", "eager"),
        ("tost", "eager"),
        ("tost", "fused"),
        pytest.param("tost", "triton", marks=pytest.mark.slow),  # 6 s in the interpreter; the core tests cover it
    ],
)
def test_no_output_or_gradient_of_a_document_depends_on_an_earlier_one(name, impl) -> None:
    lm = model(name, impl)
    ids = two_documents()
    docs = document_ids(ids, EOS)
    second = docs == 1  # (2, T)
    perturbed = ids.clone()
    perturbed[~second] = torch.randint(1, VOCAB, (int((~second).sum()),))
    perturbed[0, 6], perturbed[1, 5] = EOS, EOS  # the same documents
    with torch.no_grad():
        masked = [lm(x, document_ids=docs)[second] for x in (ids, perturbed)]
        unmasked = [lm(x)[second] for x in (ids, perturbed)]
    torch.testing.assert_close(masked[1], masked[0], atol=1e-12, rtol=0)
    assert (unmasked[1] - unmasked[0]).abs().max() > 1e-3  # without masking, the first document shows

    embedded = {}
    handle = lm.drop.register_forward_hook(lambda _, __, out: embedded.setdefault("x", out).retain_grad())
    lm(ids, document_ids=docs)[second].square().sum().backward()
    handle.remove()
    grad = embedded["x"].grad  # (2, T, D): d(loss on the second documents) / d(input embeddings)
    assert grad[second].abs().max() > 1e-3
    assert grad[~second].abs().max() == 0


# Document ids (2, 12) for the core tests, with chunks of 4 tokens: a boundary at a chunk edge (4),
# several in one chunk (5, 6), documents of one token (4, 5), one that starts inside a chunk and
# goes on into the next (6-9), and a row without boundary. (Tiny: Triton's interpreter is slow.)
CORE_DOCUMENTS = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 3, 3, 3, 4, 4], [0] * 12])
CHUNK = 4


def core_inputs(dtype: torch.dtype, T: int = 12, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """w (B, K, T, p) as split_heads gives it, its coordinates at least 0.2 from 0: at a document's
    first token S = w^2, and the energy's gradient there is 2 / w - 2 / w, which fp32 leaves at a
    rounding of 2 / w (as at a block's first token; tests/test_tssa_fused.py covers that case)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, T, 3, 4, generator=g, dtype=dtype).transpose(1, 2)
    w = w + 0.2 * w.sign()
    temp = torch.rand(3, 1, generator=g, dtype=dtype) + 0.5
    denom_bias = torch.randn(3, T + 2, generator=g, dtype=dtype) * 0.3
    return w, temp, denom_bias


def outputs_and_grads(statistics, w, temp, denom_bias, **kwargs) -> list[torch.Tensor]:
    """c, pi and the gradients of w, temp and denom_bias of a loss weighing both."""
    leaves = [t.detach().requires_grad_() for t in (w, temp, denom_bias)]
    c, pi = statistics(*leaves[:2], causal=True, denom_bias=leaves[2], **kwargs)
    g = torch.Generator().manual_seed(1)
    loss = (c * torch.randn(c.shape, generator=g, dtype=torch.float64).to(c.dtype)).sum() + (pi.square() * 3).sum()
    return [c.detach(), pi.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize(
    "impl, dtype, tol",
    [
        ("fused", torch.float32, 1e-5),
        ("fused", torch.float64, 1e-10),
        # In Triton's interpreter, slow: the fast part keeps its 90 s (the triton case of the next test stays).
        pytest.param("triton", torch.float32, 1e-5, marks=pytest.mark.slow),
    ],
    ids=["fused-fp32", "fused-fp64", "triton-fp32"],  # the Triton kernels compute in fp32 whatever the inputs
)
def test_each_implementation_equals_eager_with_documents(impl, dtype, tol) -> None:
    w, temp, denom_bias = core_inputs(dtype)
    statistics = statistics_impl(impl, w.device)
    expected = outputs_and_grads(token_statistics, w, temp, denom_bias, document_ids=CORE_DOCUMENTS)
    got = outputs_and_grads(statistics, w, temp, denom_bias, document_ids=CORE_DOCUMENTS, chunk=CHUNK)
    for name, x, want in zip(("c", "pi", "dw", "dtemp", "ddenom_bias"), got, expected, strict=True):
        scale = want.abs().max().clamp_min(1)
        torch.testing.assert_close(x / scale, want / scale, atol=tol, rtol=0, msg=name)
    # A block of one document is a block without document ids.
    plain = outputs_and_grads(token_statistics, w[1:], temp, denom_bias)
    one_document = outputs_and_grads(statistics, w[1:], temp, denom_bias, document_ids=CORE_DOCUMENTS[1:], chunk=CHUNK)
    for name, x, want in zip(("c", "pi", "dw", "dtemp", "ddenom_bias"), one_document, plain, strict=True):
        scale = want.abs().max().clamp_min(1)
        torch.testing.assert_close(x / scale, want / scale, atol=tol, rtol=0, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_document_inside_a_block_is_processed_as_if_it_started_one(impl) -> None:
    """Each document of the first row, alone at the start of a block, gives the same c and pi (fp64;
    Triton's kernels sum in fp32, in another order when the document starts inside a chunk)."""
    tol = 1e-6 if impl == "triton" else 1e-12
    w, temp, denom_bias = core_inputs(torch.float64)
    statistics = statistics_impl(impl, w.device)
    kwargs = {} if impl == "eager" else {"chunk": CHUNK}
    c, pi = statistics(w, temp, causal=True, denom_bias=denom_bias, document_ids=CORE_DOCUMENTS, **kwargs)
    for doc in CORE_DOCUMENTS[0].unique():
        tokens = (CORE_DOCUMENTS[0] == doc).nonzero()[:, 0]
        a, b = int(tokens[0]), int(tokens[-1]) + 1
        c_alone, pi_alone = statistics(w[:1, :, a:b], temp, causal=True, denom_bias=denom_bias, **kwargs)
        torch.testing.assert_close(c[:1, :, a:b], c_alone, atol=tol, rtol=0)
        torch.testing.assert_close(pi[:1, :, a:b], pi_alone, atol=tol, rtol=0)


def test_the_recurrent_form_restarts_after_each_eos_as_the_parallel_form_does() -> None:
    """Token by token, to the recurrent state's fp32 (the parallel form runs in fp64 here)."""
    lm = model("tost")
    ids = two_documents(T=24, first=9)
    ids[0, 15] = EOS  # three documents in the first row
    with torch.no_grad():
        parallel = lm(ids, document_ids=document_ids(ids, EOS))  # (B, T, V)
        states = lm.init_states(2)
        stepped = torch.stack([lm.step(ids[:, t], states, eos_id=EOS) for t in range(24)], dim=1)
        torch.testing.assert_close(stepped, parallel, atol=1e-6, rtol=0)
        for T0 in (9, 12):  # a prompt ending with EOS (row 0), or inside a document: prefill, then step
            logits, states = lm.prefill(ids[:, :T0], eos_id=EOS)
            torch.testing.assert_close(logits, parallel[:, T0 - 1], atol=1e-6, rtol=0)
            for t in range(T0, 24):
                torch.testing.assert_close(lm.step(ids[:, t], states, eos_id=EOS), parallel[:, t], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "tost"])
def test_the_loss_still_averages_over_every_token(name) -> None:
    lm = model(name)
    blocks = two_documents(T=21)
    ids, labels = blocks[:, :-1], blocks[:, 1:]
    docs = document_ids(ids, EOS)
    with torch.no_grad():
        logits = lm(ids, document_ids=docs)
        expected = F.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1))  # every token
        torch.testing.assert_close(lm(ids, labels, document_ids=docs), expected, atol=1e-6, rtol=0)
        assert (lm(ids, labels) - expected).abs() > 1e-4  # the mask changed the loss, yet over all tokens


@pytest.mark.parametrize("impl", ["fused", pytest.param("triton", marks=pytest.mark.slow)])
def test_the_custom_ops_pass_torchs_checks_with_documents(impl) -> None:
    """Schema, fake implementation and autograd registration with document ids, as torch.compile,
    FSDP2 and DeepSpeed trace them (compiled blocks: the slow engine test below)."""
    importlib.import_module(f"pretrain.models.tssa_{impl}")  # registers the op
    w, temp, denom_bias = core_inputs(torch.float32)
    args = (w.requires_grad_(), temp.requires_grad_(), denom_bias.requires_grad_())
    if impl == "fused":
        op, args = torch.ops.whitebox.tssa.default, (*args, None, None, True, 1e-12, CHUNK, CORE_DOCUMENTS)
    else:
        op, args = torch.ops.whitebox.tssa_triton.default, (*args, True, 1e-12, CHUNK, CORE_DOCUMENTS)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def train_with_documents(dist_info, variants: dict[str, list[str]], steps: int) -> dict[str, list[float]] | None:
    """Each variant's losses over `steps` steps whose micro-batches carry document_ids (EOS = token 0
    of the helpers' 16-token alphabet: blocks of several documents); rank 0 returns them."""
    blocks = global_batches(steps, 8)
    out = {}
    for label, overrides in variants.items():
        cfg = config("tost_gpt2", overrides, 8, 2, lr=1e-2)
        torch.manual_seed(cfg.train.seed)
        engine = build_engine(build_model(cfg.model), cfg, dist_info)
        losses = []
        for block in blocks:
            micro = rank_micro_batches(block, dist_info.rank, dist_info.world_size, cfg.train.micro_batch_size)
            if "documents" in label:
                micro = [{**m, "document_ids": document_ids(m["input_ids"], EOS)} for m in micro]
            losses.append(mean_over_ranks(engine.train_step(micro).loss))
        out[label] = losses
    return out if dist_info.rank == 0 else None


@pytest.mark.slow
def test_document_ids_reach_the_model_through_every_engine() -> None:
    """ZeRO-3 and FSDP2 on two ranks, with activation checkpointing, and compiled blocks, train with
    document_ids in the batch as one eager rank does; without them the losses differ."""
    reference = {"documents": ["engine=ddp", "model.tssa_impl=eager"], "plain": ["engine=ddp"]}
    (expected,) = run_local_world(train_with_documents, 1, reference, 8)
    documents, plain = torch.tensor(expected["documents"]), torch.tensor(expected["plain"])
    assert (documents - plain).abs().max() > 1e-3  # the key changes the steps, so agreement means it arrived
    engines = {
        "zero3+ac documents": ["engine=deepspeed", "engine.zero_stage=3", "engine.activation_checkpointing=full"],
        "fsdp+ac documents": ["engine=fsdp", "engine.activation_checkpointing=full"],
        "ddp+compile documents": ["engine=ddp", "engine.compile=true"],
    }
    results = run_local_world(train_with_documents, 2, engines, 8)[0]
    for label, losses in results.items():
        assert losses == pytest.approx(expected["documents"], rel=1e-5), label
