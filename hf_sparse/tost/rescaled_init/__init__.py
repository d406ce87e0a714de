"""Layer-wise rescaled initialisation of a sparse network: GradInit-style learned scales or a closed form."""

from .density import density_rescale
from .gradinit import GradInitReport, gradinit_rescale, scaled_parameter_names


__all__ = ["GradInitReport", "density_rescale", "gradinit_rescale", "scaled_parameter_names"]
