"""kdloss: fused knowledge-distillation losses (Python binding over
libkdloss.so via ctypes; pure Python).

    import kdloss.numpy    # NumPy arrays, float64 CPU reference
    import kdloss.torch    # torch tensors: autograd, CPU reference or CUDA kernels

The shared library is found through KDLOSS_LIBRARY, then next to this
package, then the system loader (see kdloss._lib).
"""

from ._lib import (  # noqa: F401
    InvalidRowsError,
    KdlossError,
    KdlossValueError,
    device_available,
    divergence_names,
    ext_available,
    head_rule_names,
    library_path,
    ot_available,
    reduction_names,
    sparse_mode_names,
    version,
)

__version__ = "0.1.0"
