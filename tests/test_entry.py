"""The entry point's contract: launcher arguments, config errors as one named line."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import launch

from pretrain.config import TrainConfig, grad_accum_steps, load_config
from pretrain.distributed import gpu_for_rank, strip_launcher_args
from pretrain.errors import UserError

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "exp").glob("*.yaml"))
SHARDS = ['data.urls="file:///data/shard-{000000..000009}.tar"', 'data.val_urls="file:///data/val-{0..1}.tar"']


def test_deepspeed_local_rank_argument_is_stripped():
    argv = ["+exp=tost_gpt2_smoke", "--local_rank=1", "optim.lr=1e-3", "--local_rank", "0"]
    assert strip_launcher_args(argv) == ["+exp=tost_gpt2_smoke", "optim.lr=1e-3"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, key",
    [
        (["+exp=tost_gpt2_smoke", "optim.lrr=1e-3"], "optim.lrr"),
        (["+exp=tost_gpt2"], "data.urls"),
        (["+exp=tost_gpt2_smoke", "train.max_steps=many"], "train.max_steps"),
        (["+exp=tost_gpt2", "data.urls=s3://b/shard-{0..9}.tar"], "data.urls=s3://b/shard-{0..9}.tar"),
        (["+exp=tost_gpt2", *(f"data.urls=s3://b/shard-{i}.tar" for i in range(3))], "data.urls"),  # shell-expanded
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides, key):
    proc = launch("python", overrides, timeout=120, keep_repeats=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"'{key}'" in lines[0], proc.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lr=-1"], r"'optim.lr' is -1.0: it must be a finite number > 0"),
        (["optim.lr=nan"], r"'optim.lr' is nan: it must be a finite number > 0"),
        (["data.num_workers=-1"], r"'data.num_workers' is -1: it must be a finite number >= 0"),
        (["train.max_steps=-5"], r"'train.max_steps' is -5: it must be a finite number >= 0"),
        (["checkpoint.interval=0"], r"'checkpoint.interval' is 0: it must be a finite number >= 1"),
        (["optim.lr=1e-3", "optim.lr=2e-3"], r"'optim.lr' is given 2 times on the command line: give it once$"),
        (
            [*(f"data.urls=/d/shard-{i}.tar" for i in range(3)), "data=shards"],
            r"'data.urls' is given 3 times .* an unquoted brace URL expands in the shell",
        ),
        (["x" * 100_000 + "=1"], r"'x{40}\.\.\.' is 100000 characters long"),
        (["data.urls=/d/shard-0.tar"], r"data.urls is set, but data.source=stdlib reads the embedded default"),
        (["data.val_urls=/d/val-0.tar"], r"data.val_urls is set, but data.source=stdlib"),
    ],
)
def test_values_that_cannot_work_are_refused_naming_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(["+exp=tost_gpt2_smoke", *overrides])
    assert (
        load_config(["+exp=tost_gpt2_smoke", "data=shards", "data.urls=/d/shard-0.tar"]).data.urls == "/d/shard-0.tar"
    )


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_file_in_configs_exp_is_an_experiment_with_its_own_run_dir(name):
    """Mixins live in configs/smoke/: what configs/exp/ lists, a user can run as it is (given
    the shards a full recipe needs), and its runs do not land in another experiment's directory."""
    cfg = load_config([f"+exp={name}", *([] if name.endswith("_smoke") else SHARDS)])
    assert cfg.run_dir == f"runs/{name}"
    assert cfg.data.source in (("stdlib", "digits") if name.endswith("_smoke") else ("shards",))


def test_every_experiment_composes():
    for name in ("tost_gpt2_smoke", "gpt2_smoke"):
        assert load_config([f"+exp={name}"]).data.source == "stdlib"
    for name, model in (("tost_gpt2", "tost"), ("gpt2", "gpt2")):
        cfg = load_config([f"+exp={name}", 'data.urls="file:///data/shard-{000000..000009}.tar"'])
        assert cfg.model.name == model and cfg.model.n_layer == 12 and cfg.engine.precision == "bf16"
        assert cfg.train.global_batch_size * cfg.model.seq_len == 491_520  # the paper's tokens per step
        assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps) == (6e-4, 6e-5, 2000)


def test_accumulation_keeps_the_global_batch_on_any_world_size():
    train = TrainConfig(global_batch_size=480, micro_batch_size=12)
    assert [grad_accum_steps(train, n) for n in (1, 2, 8)] == [40, 20, 5]
    with pytest.raises(UserError, match="train.global_batch_size"):
        grad_accum_steps(train, 7)


def test_a_rank_without_a_gpu_is_refused_in_one_line_naming_the_count():
    """Two ranks on a one-GPU node: rank 1 is told to start fewer processes or hide the GPUs,
    instead of failing inside CUDA (torch.cuda.set_device(1))."""
    assert [gpu_for_rank(r, 2) for r in (0, 1)] == [0, 1]
    with pytest.raises(UserError, match=r"^local rank 1 has no GPU: torch sees 1 on this node; .*--num_gpus 1") as e:
        gpu_for_rank(1, 1)
    assert "\n" not in str(e.value)
