"""Hierarchical Attention in other networks (the paper's plug-in claim).

* ``hat_swin``: :func:`add_hat` puts HAT into timm's Swin Transformer; registers ``hat_swin_*`` models with timm.

For your own network use :class:`open_fastervit.layers.HierarchicalAttention` directly.
"""

from .hat_swin import HatSwinTransformer, add_hat, carrier_keys, load_swin_state_dict

__all__ = ["HatSwinTransformer", "add_hat", "carrier_keys", "load_swin_state_dict"]
