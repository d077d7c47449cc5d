"""mixtral-mlx: train, fine-tune, run and look inside sparse MoE language models with MLX."""

from . import blas as _blas
from . import cpu_jit as _cpu_jit
from . import cpu_streams as _cpu_streams

_blas.preload()  # must run before the first `import mlx`; see blas.py
_cpu_jit.install()  # before MLX compiles its first kernel; see cpu_jit.py
_cpu_streams.configure()  # before MLX evaluates anything; see cpu_streams.py

from .config import ModelArgs, load_preset  # noqa: E402
from .errors import UserError  # noqa: E402
from .model import Model  # noqa: E402
from .checkpoint import load, save  # noqa: E402
from .generate import generate, next_token_logits, stream_generate  # noqa: E402
from .analysis import capture  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ModelArgs", "Model", "UserError", "capture", "generate", "load", "load_preset", "next_token_logits",
           "save", "stream_generate", "__version__"]
