"""dmdx_lightning: DMDX (ADP + ADM) and DMD/DMD2 diffusion distillation as Lightning modules."""

__version__ = "0.1.0"
