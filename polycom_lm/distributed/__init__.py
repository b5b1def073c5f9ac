"""Parallelism applied to a built model from outside: engines (`ddp`, `fsdp`, `deepspeed`) registered in
`ENGINES`, tensor parallelism (`tensor_parallel.py`) on a `("dp", "tp")` mesh (`mesh.py`), and DCP
checkpoints that reshard across world sizes and TP degrees (`checkpointing.py`).

Importing this package registers every engine; DeepSpeed itself is imported only when its engine is used.
"""

from polycom_lm.distributed.engine import ENGINES, Engine, build_engine
from polycom_lm.distributed import ddp, deepspeed_engine, fsdp  # noqa: F401,E402  (register the engines)

__all__ = ["ENGINES", "Engine", "build_engine"]
