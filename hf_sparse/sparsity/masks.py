"""`hf_sparse.sparsity.masks`: the first-round name of `hf_sparse.tost.masks`."""

from ..tost.masks import *  # noqa: F401,F403
from ..tost.masks import __all__  # noqa: F401
