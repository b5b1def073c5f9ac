"""Parallelism applied to a built model from outside (models never import torch.distributed).

Read in this order: `parallelize.py` (config → engine → the ordered transformations), `mesh.py`
(process groups, device meshes, degree checks), `engine.py` (the contract; engines `ddp.py`, `fsdp.py`,
`deepspeed_engine.py` own data parallelism, optimizer wrapping and checkpoint format), the
transformations `tensor_parallel.py` and `expert_parallel.py`, and the state they share: `state_dict.py`
(canonical checkpoint layout), `gradients.py` (global norm), `local_shards.py`.

This package imports nothing on its own: import `polycom_lm.distributed.parallelize` for the entry points.
"""
