"""Compositions of parts: the KOALA presets and the :class:`Composition` type."""

from kalmanopt.filters.composition import Composition
from kalmanopt.filters.koala import koala_diag, koala_m, koala_pp, koala_pp_lr, koala_pp_ns, koala_v

__all__ = ["Composition", "koala_v", "koala_m", "koala_pp", "koala_pp_ns", "koala_diag", "koala_pp_lr"]
