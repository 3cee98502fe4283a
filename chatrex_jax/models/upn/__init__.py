"""UPN (Universal Proposal Network): Swin backbone + multi-scale deformable DETR with
fine/coarse prompts. Modules: swin.py, deformable.py (MSDA), transformer.py, upn.py."""
from chatrex_jax.models.upn.deformable import MSDeformAttn
from chatrex_jax.models.upn.swin import SWIN_VARIANTS, SwinConfig, SwinTransformer
from chatrex_jax.models.upn.upn import UPN, UPNConfig

__all__ = ["MSDeformAttn", "SWIN_VARIANTS", "SwinConfig", "SwinTransformer", "UPN", "UPNConfig"]
