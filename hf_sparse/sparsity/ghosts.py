"""`hf_sparse.sparsity.ghosts`: the first-round name of `hf_sparse.tost.ghosts`."""

from ..tost.ghosts import *  # noqa: F401,F403
from ..tost.ghosts import __all__  # noqa: F401
