"""The sparsity methods, one file each (``st3.py``: ``st3``, ``st3_sigma``; ``gmp.py``: ``gmp``, ``ste_hard``,
``dense``; ``feather.py``; ``probmask.py``), their interface (``base.py``) and registry :data:`METHODS`."""
from st3_hf.sparse.methods.base import METHODS, SparsityMethod, refuse, register
from st3_hf.sparse.methods import st3, gmp, feather, probmask  # noqa: F401  (each registers its methods)

__all__ = ["METHODS", "SparsityMethod", "refuse", "register"]
