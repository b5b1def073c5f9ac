"""polycom_lm: pretraining decoder LLMs to compare polynomial composition activations with ReLU, GELU, SwiGLU."""

__version__ = "0.1.0"
