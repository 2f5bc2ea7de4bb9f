"""The quantized ``nn.MultiheadAttention``.

Its input projection is ``in_proj_weight`` ``(3 * embed_dim, embed_dim)``, or, when keys or
values have another width (``kdim``/``vdim``), ``q_proj_weight``, ``k_proj_weight`` and
``v_proj_weight``: each quantized per row (per output feature), as a Linear's weight. The
output projection ``out_proj`` is a Linear subclass, quantized as a Linear. ``forward`` is
torch's own (its fast paths included, and those of ``nn.TransformerEncoderLayer``), reading
the dequantized weights by their names.
"""

from torch import nn

from .base import register
from .multi_weight import QuantizedMultiWeight


@register(nn.MultiheadAttention)
class QuantizedMultiheadAttention(QuantizedMultiWeight, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with int input-projection weights."""

    @classmethod
    def weight_names(cls, module: nn.Module) -> list[str]:
        """``["in_proj_weight"]``, or the three separate projections with ``kdim``/``vdim``."""
        if module._qkv_same_embed_dim:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
