"""The `ddp` engine: data parallelism by replicated parameters and all-reduced (averaged) gradients.

- World size 1 (no `torchrun`): the model is used as is.
- Plain models: PyTorch `DistributedDataParallel`; `no_sync` skips the gradient all-reduce on all but
  the last micro-batch of an accumulation window. Expert-parallel shards are left out (the model lists
  them in `_ddp_params_and_buffers_to_ignore`; their own hooks reduce them).
- Tensor-parallel models (DTensor parameters, which `DistributedDataParallel` does not take) and pipeline
  stages: FSDP2 with every data-parallel rank a full replica (HSDP with shard degree 1), the same semantics.

Checkpoints: DCP in the canonical layout (`Engine.save_checkpoint`), so a run saved on two ranks resumes
on one and vice versa, under any engine that reads DCP.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from polycom_lm.distributed.engine import ENGINES, Engine, OptimizerFactory
from polycom_lm.distributed.fsdp import apply_fsdp, fsdp_micro_batch_context


@ENGINES.register("ddp")
class DDPEngine(Engine):
    """Replicated parameters, averaged gradients (DDP; FSDP2 replication for tensor-parallel models)."""

    def wrap(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        self.module = model
        self._replicated_dtensors = False
        self.model = self.data_parallel(model) if self.mesh.distributed else model
        self.optimizer = build_optimizer(model)

    def data_parallel(self, model: nn.Module) -> nn.Module:
        # Pipeline stages are replicated by FSDP2 too: torch's DDP reducer fails its bucket rebuild on the
        # second step when a schedule runs one backward per micro-batch ("rebuilt parameter indices size is
        # not same as original model parameters size", torch 2.13).
        dtensors = any(isinstance(parameter, DTensor) for parameter in model.parameters())
        if dtensors or self.config.distributed.pp > 1:
            apply_fsdp(model, self.mesh.data_mesh, self.config.training.precision,
                       self.config.distributed.fsdp_cpu_offload, self.device)
            self._replicated_dtensors = True
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, process_group=self.mesh.dp_group)

    def micro_batch_context(self, is_last_micro_batch: bool) -> ContextManager:
        if not self.mesh.distributed:
            return contextlib.nullcontext()
        if self._replicated_dtensors:
            return fsdp_micro_batch_context(self.model, is_last_micro_batch)
        return self.model.no_sync() if not is_last_micro_batch else contextlib.nullcontext()
