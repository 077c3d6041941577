"""DeepSpeed ZeRO (stages 0-3) behind the Engine interface.

Our config stays the source of truth: the optimizer (with its weight-decay groups) and the
schedule are built by pretrain.optim and handed to DeepSpeed, which only gets the few settings
it must own (micro-batch, accumulation, clipping, ZeRO stage, precision). Batches come from our
own stream: `deepspeed.initialize(training_data=...)` would need a dataset with `len()`.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import shutil
import tempfile
from types import SimpleNamespace

import deepspeed
import torch
from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from torch import nn

from pretrain.batch import Batch
from pretrain.config import Config, grad_accum_steps
from pretrain.distributed import DistInfo
from pretrain.engines.base import Accept, Engine, StepResult
from pretrain.engines.extensions import build_deepspeed_ops
from pretrain.errors import UserError
from pretrain.optim import build_optimizer, build_scheduler, param_groups

# Keys generated from our config that an override must not change: our trainer feeds exactly
# this many micro-batches, and the optimizer and schedule are ours.
DERIVED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON config generated from ours, with `engine.deepspeed_overrides` merged last."""
    zero: dict = {"stage": cfg.engine.zero_stage}
    if cfg.engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    generated = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg.train, world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.engine.precision == "bf16"},  # its check_grad_overflow (default on) skips NaN steps
        "steps_per_print": 2**31 - 1,  # our trainer logs; keep DeepSpeed's own step log quiet
        # ZeRO vets a list of known optimizers; ours (Lion) acts elementwise, so partitioning
        # its state is as sound as Adam's.
        "zero_allow_untested_optimizer": cfg.optim.name != "adamw",
    }
    return _merge(generated, cfg.engine.deepspeed_overrides)


def _optimizer(model: nn.Module, cfg: Config, on_gpu: bool) -> torch.optim.Optimizer:
    """Our AdamW, fused on a GPU (DeepSpeed steps it on its fp32 master weights, which live on the
    GPU without offload); with ZeRO-Offload, DeepSpeed's CPU AdamW over the same groups and settings."""
    if not cfg.engine.offload_optimizer:
        return build_optimizer(model, cfg.optim, fused=on_gpu)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(
        param_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        adamw_mode=True,
    )


class DeepSpeedEngine(Engine):
    def __init__(self, model: nn.Module, cfg: Config, dist: DistInfo):
        self.device, self.local_rank = dist.device, dist.local_rank
        self._model = model
        # Built before DeepSpeed asks for them, so that a build a kill left unfinished cannot hang us.
        build_deepspeed_ops(["ShareMemCommBuilder", *(["CPUAdamBuilder"] if cfg.engine.offload_optimizer else [])])
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=_optimizer(model, cfg, on_gpu=dist.device.type == "cuda"),
            lr_scheduler=lambda optimizer: build_scheduler(optimizer, cfg.optim),
            config=deepspeed_config(cfg, dist.world_size),
            dist_init_required=False,
        )
        # DeepSpeed keeps the global gradient norm only where a ZeRO or mixed-precision optimizer
        # computes it; ZeRO-0 in fp32 clips with torch and drops the norm, so measure it here.
        self._measure_grad_norm = not (
            self.engine.zero_optimization() or self.engine.bfloat16_enabled() or self.engine.fp16_enabled()
        )

    @property
    def model(self) -> nn.Module:
        return self._model

    def train_step(self, micro_batches: list[Batch], accept: Accept | None = None) -> StepResult:
        """A withheld step goes through ZeRO's own skip of a non-finite step: the last micro-batch's
        loss is made NaN before its backward pass. DeepSpeed without ZeRO has no such skip, so
        `accept` is refused there (see check_engine_config)."""
        lr = self.engine.get_lr()[0]
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # float64: the sum a Python float made
        grad_norm, withheld = None, False
        for i, batch in enumerate(micro_batches):
            loss = self.engine(**self.to_device(batch))
            total += loss.detach()
            if accept is not None and i == len(micro_batches) - 1:  # on every rank: `accept` is collective
                # A host sync before the last backward: withholding has to choose that backward's loss.
                withheld = not accept(total.item() / len(micro_batches))
            self.engine.backward(loss * float("nan") if withheld else loss)
            if self._measure_grad_norm and self.engine.is_gradient_accumulation_boundary():
                grad_norm = self._grad_norm()
            self.engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
        if grad_norm is None:
            grad_norm = float(self.engine.get_global_grad_norm())
        # ZeRO skips a step whose norm is not finite; without ZeRO DeepSpeed applies it.
        skipped = not self.engine.was_step_applied() and not withheld
        # DeepSpeed's step has already waited for the GPU (its overflow check and norm are read on
        # the host): fetching the loss here costs no further stall.
        return StepResult(total.item() / len(micro_batches), grad_norm, lr, skipped, withheld)

    def predict(self, batch: Batch) -> torch.Tensor:
        inputs = {k: v for k, v in self.to_device(batch).items() if k != "labels"}
        self.engine.eval()
        try:
            with torch.no_grad():
                return self.engine(**inputs)
        finally:
            self.engine.train()

    def to_device(self, batch: Batch) -> Batch:
        """DeepSpeed's bf16 holds the model in bf16 and leaves the inputs alone: cast images too."""
        dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else None
        return {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else None, non_blocking=True)
            for k, v in batch.items()
        }

    def _grad_norm(self) -> float:
        """Global norm of the (already all-reduced) gradients, before DeepSpeed clips them."""
        norms = [p.grad.detach().float().norm() for p in self._model.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)).item()

    def save(self, step_dir: str) -> None:
        root, tag = os.path.split(os.path.normpath(step_dir))
        self.engine.save_checkpoint(root, tag=tag, save_latest=False)

    def load(self, step_dir: str, saved_world_size: int) -> None:
        """ZeRO partitions the optimizer state by rank: files written by another number of
        ranks go through DeepSpeed's universal checkpoint (one file per parameter), converted
        by each node's first rank into node-local scratch space, loaded, and removed."""
        if not os.path.isfile(os.path.join(step_dir, "mp_rank_00_model_states.pt")) and not glob.glob(
            os.path.join(step_dir, "zero_pp_rank_*_model_states.pt")
        ):
            raise UserError(f"checkpoint {step_dir} holds no DeepSpeed engine files; was it written by another engine?")
        if saved_world_size == torch.distributed.get_world_size() or not self.engine.zero_optimization():
            self._load(step_dir)
            return
        universal = os.path.join(
            tempfile.gettempdir(),
            "whitebox-universal",
            hashlib.sha256(os.path.abspath(step_dir).encode()).hexdigest()[:16],
            "universal",
        )
        if self.local_rank == 0:
            shutil.rmtree(os.path.dirname(universal), ignore_errors=True)
            with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its progress
                ds_to_universal(
                    SimpleNamespace(
                        input_folder=step_dir,
                        output_folder=universal,
                        num_extract_workers=1,
                        num_merge_workers=1,
                        keep_temp_folder=False,
                        strict=True,
                        inject_missing_state=True,
                    )
                )
        torch.distributed.barrier()
        # DeepSpeed reads this flag only while loading; it must be off again for the next
        # ordinary checkpoint. There is no public setter.
        self.engine._config.load_universal_checkpoint = True
        try:
            self._load(universal)
        finally:
            self.engine._config.load_universal_checkpoint = False
        if self.engine.zero_optimization_partition_weights():
            self._repair_zero3_universal_load(universal)
        torch.distributed.barrier()
        if self.local_rank == 0:
            shutil.rmtree(os.path.dirname(universal), ignore_errors=True)

    def _repair_zero3_universal_load(self, universal: str) -> None:
        """Undo two faults of DeepSpeed 0.19's ZeRO-3 universal loader (stage3.py): it copies
        param group 0's settings (weight decay) onto every group, and puts one `step` tensor into
        every sub-group's Adam state, which torch then increments once per sub-group, running the
        bias correction ahead (a run resharded 2 -> 1 -> 2 ranks would diverge after one step)."""
        saved = torch.load(os.path.join(universal, "zero", "optimizer_state.pt"), weights_only=False)[
            "optimizer_state_dict"
        ]["param_groups"]
        zero = self.engine.optimizer
        for group, saved_group in zip(zero.param_groups, saved, strict=True):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        for flat in zero.fp32_partitioned_groups_flat:
            state = zero.optimizer.state.get(flat, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def _load(self, step_dir: str) -> None:
        root, tag = os.path.split(os.path.normpath(step_dir))
        self.engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        self._place_fused_steps()

    def _place_fused_steps(self) -> None:
        """Fused AdamW wants each `step` as fp32 on its parameter's device; DeepSpeed's universal
        loader sets the `step` that its converter read, wherever that put it (torch's own
        load_state_dict would have moved it)."""
        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # under ZeRO / bf16: ours
        for group in base.param_groups:
            if not group.get("fused"):
                continue
            for p in group["params"]:
                state = base.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(p.device, torch.float32)

    # ZeRO-3 partitions each weight flat over the ranks (`ds_tensor`, the last one padded); the
    # other stages keep whole weights on every rank, which the base class handles.

    def _partitioned(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self._model.named_parameters() if p.requires_grad}

    def local_weights(self) -> dict[str, torch.Tensor]:
        if not self.engine.zero_optimization_partition_weights():
            return super().local_weights()
        return {name: p.ds_tensor.detach() for name, p in self._partitioned().items()}

    def set_local_weights(self, values: dict[str, torch.Tensor]) -> None:
        super().set_local_weights(values)
        if self.engine.zero_optimization_partition_weights():
            # Weights gathered now (small ones stay so between steps: ZeRO-3's persistence
            # threshold) hold old values: free them, and gather the persistent ones again from
            # the new partitions, as DeepSpeed does after a step.
            gathered = [p for p in self._model.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE]
            if gathered:
                gathered[0].partition(gathered)
            persistent = [p for p in self._model.parameters() if p.ds_persist]
            if persistent:
                persistent[0].all_gather(persistent)

    def full_weights(self, pieces: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.engine.zero_optimization_partition_weights():
            return super().full_weights(pieces)
        world, full = torch.distributed.get_world_size(), {}
        for name, p in self._partitioned().items():
            parts = [torch.empty_like(pieces[name]) for _ in range(world)]
            torch.distributed.all_gather(parts, pieces[name].contiguous())
            full[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
        return full if torch.distributed.get_rank() == 0 else {}

    def local_pieces(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.engine.zero_optimization_partition_weights():
            return super().local_pieces(full)
        rank, pieces = torch.distributed.get_rank(), {}
        for name, p in self._partitioned().items():
            size = p.ds_tensor.numel()
            flat = full[name].flatten()[rank * size : (rank + 1) * size]
            pieces[name] = torch.cat([flat, flat.new_zeros(size - len(flat))]).to(self.device)
        return pieces

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.engine.zero_optimization_partition_weights():
            # ZeRO-3: gather the shards (the gather behind DeepSpeed's save_16bit_model; tensors
            # come in the training dtype, fp32 or bf16).
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self._model.state_dict()
        if torch.distributed.get_rank() != 0:
            return {}
        return {k: v.detach().cpu().clone() for k, v in state.items()}
