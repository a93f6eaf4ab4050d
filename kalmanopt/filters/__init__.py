"""The KOALA presets: compositions of parts, one short definition each.

The type is :class:`kalmanopt.composition.Composition`.
"""

from kalmanopt.filters.koala import koala_diag, koala_m, koala_pp, koala_pp_lr, koala_pp_ns, koala_v

__all__ = ["koala_v", "koala_m", "koala_pp", "koala_pp_ns", "koala_diag", "koala_pp_lr"]
