"""`hf_sparse.sparsity.rescaled_init`: the first-round name of `hf_sparse.tost.rescaled_init`."""

from ..tost.rescaled_init import *  # noqa: F401,F403
from ..tost.rescaled_init import __all__  # noqa: F401
