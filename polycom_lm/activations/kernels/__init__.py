"""PolyCom kernels: plain-autograd references, the closed-form math, memory-efficient autograd Functions
on eager / compiled / Triton backends, and the compiled custom ops. `select.resolve_impl` picks one."""
