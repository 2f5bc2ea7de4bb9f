"""The quantized embeddings: ``nn.Embedding`` and ``nn.EmbeddingBag``.

The table ``(num_embeddings, embedding_dim)`` is quantized as a Linear weight is: one scale and
zero point per row (per token), channels on axis 0, SQuant's kernel pass over 1-element kernels
and its channel pass over each row. A forward looks up the distinct tokens of its input in the
codes and dequantizes only those rows, so a large vocabulary costs its int8 codes, never a
float copy of the table; the rows are then handed to torch's own ``F.embedding`` /
``F.embedding_bag`` with the input renumbered, so every option (``padding_idx``,
``max_norm``, the bag modes, ``offsets``, ``per_sample_weights``) behaves exactly as the float
layer holding the dequantized table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.tensor import QuantizedTensor, dequantize_codes
from .base import QuantizedModule, register


class _QuantizedTable(QuantizedModule):
    """What the two embeddings share: no bias, integer input, row lookup from the codes."""

    has_bias = False
    float_input = False

    def lookup(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """The rows of the table that ``input`` uses, and ``input`` renumbered into them.

        Returns ``(indices, rows, padding)``: ``indices`` has ``input``'s shape and dtype and
        indexes ``rows`` (``(distinct tokens + 1, embedding_dim)``, the weight's dtype,
        dequantized exactly as :attr:`weight` is); every token equal to ``padding_idx`` maps to
        the last row, ``padding``, which stands for ``padding_idx`` (None without one).

        Raises ``IndexError`` (from torch) for a token outside ``0 .. num_embeddings - 1``.
        """
        tokens, indices = torch.unique(input, return_inverse=True)
        padding = None
        if self.padding_idx is not None:
            padding = tokens.shape[0]
            indices = indices.masked_fill(input == self.padding_idx, padding)
        # The extra last row (``padding_idx``'s, else row 0's) keeps ``rows`` non-empty and
        # stands for ``padding_idx``.
        extra = tokens.new_full((1,), self.padding_idx or 0, dtype=torch.long)
        wanted = torch.cat([tokens.long(), extra])
        if wanted.numel() > 1 and (wanted.min() < 0 or wanted.max() >= self.codes.shape[0]):
            raise IndexError(f"{type(self).__name__}: token ids must lie in 0.."
                             f"{self.codes.shape[0] - 1}, got {int(wanted.min())}.."
                             f"{int(wanted.max())}")
        with torch.inference_mode(False):
            rows = dequantize_codes(self.codes[wanted], self.scale[wanted],
                                    self.zero_point[wanted], 0,
                                    group_size=getattr(self, "group_size", None)
                                    ).to(self.weight_dtype)
        return indices.to(input.dtype), rows, padding


@register(nn.Embedding)
class QuantizedEmbedding(_QuantizedTable, nn.Embedding):
    """``nn.Embedding`` with an int table, looked up row by row from the codes."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``F.embedding`` of ``input`` (int64/int32 token ids, any shape) on the dequantized
        rows it uses: ``(*input.shape, embedding_dim)``. With ``max_norm`` the looked-up rows
        are renormalized as the float layer renormalizes its table (the codes stay)."""
        indices, rows, padding = self.lookup(input)
        return F.embedding(indices, rows, padding, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


@register(nn.EmbeddingBag)
class QuantizedEmbeddingBag(_QuantizedTable, nn.EmbeddingBag):
    """``nn.EmbeddingBag`` with an int table, looked up row by row from the codes.

    ``mode`` is SQuant's mode, as on every quantized module; the bag's reduction (the float
    layer's ``mode``: ``"sum"``, ``"mean"`` or ``"max"``) is ``bag_mode``.
    """

    bag_mode: str

    @classmethod
    def from_float(cls, module: nn.Module, qweight: QuantizedTensor,
                   cache_weight: bool = True) -> QuantizedEmbeddingBag:
        qmodule = super().from_float(module, qweight, cache_weight)
        qmodule.bag_mode = module.mode
        return qmodule

    def to_float(self, weight: nn.Parameter | None = None) -> nn.Module:
        module = super().to_float(weight)
        module.mode = self.bag_mode
        return module

    def extra_repr(self) -> str:
        """The float layer's description (its ``mode`` the bag's), then SQuant's options."""
        return super().extra_repr().replace(f"mode={self.mode!r}", f"mode={self.bag_mode!r}", 1)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``F.embedding_bag`` (``mode`` sum, mean or max) of ``input`` (a 2-D batch of bags, or
        1-D with ``offsets``) on the dequantized rows it uses: ``(bags, embedding_dim)``."""
        indices, rows, padding = self.lookup(input)
        return F.embedding_bag(indices, rows, offsets, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.bag_mode, self.sparse,
                               per_sample_weights, self.include_last_offset, padding)
