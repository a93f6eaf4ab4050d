"""The fast paths: ``implementation="foreach"`` (multi-tensor, any device) and ``"fused"`` (CUDA, Triton).

Both follow the :ref:`two-pass <derivation-one-pass>` structure and are tested equal to the reference path. Both
run :meth:`KalmanOptimizer.step` without a host-device synchronisation (see
:mod:`kalmanopt.fast.step`). Triton is imported only when a fused step first runs, so this
package imports without it.
"""

from kalmanopt.fast.foreach import ForeachImplementation
from kalmanopt.fast.fused import FusedImplementation
from kalmanopt.implementations import register_implementation

__all__ = ["ForeachImplementation", "FusedImplementation"]

register_implementation(ForeachImplementation())
register_implementation(FusedImplementation())
