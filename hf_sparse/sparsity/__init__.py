"""The ToST techniques under their first-round name: `hf_sparse.sparsity` re-exports `hf_sparse.tost` (masks, ghosts,
rescaled initialisations, the trainer). New code imports from `hf_sparse.tost` or its sub-packages."""

from ..tost import *  # noqa: F401,F403
from ..tost import __all__  # noqa: F401
