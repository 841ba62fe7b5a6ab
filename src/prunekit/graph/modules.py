"""Modules that structured pruning swaps in where PyTorch's own cannot take the new shapes.

``nn.MultiheadAttention`` requires its inner width (heads x head_dim) to equal its embedding
width, and its output width too. After heads or embedding channels are removed,
:class:`PrunableMultiheadAttention` (a subclass, so ``isinstance`` checks still hold) computes
the same attention with independent input, inner and output widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PrunableMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose inner width (``num_heads * head_dim``) and output width may
    differ from ``embed_dim``. Same parameters, same call signature, same results.

    Made by structured pruning (the class of a pruned ``nn.MultiheadAttention`` is swapped in
    place); it is not meant to be constructed directly.
    """

    def forward(  # noqa: D102 - same contract as nn.MultiheadAttention.forward
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        length, batch, _ = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        inner = heads * head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(inner)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(inner)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, batch, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, batch, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src = k.shape[0]
        q = q.reshape(length, batch * heads, head_dim).transpose(0, 1)
        k = k.reshape(src, batch * heads, head_dim).transpose(0, 1)
        v = v.reshape(src, batch * heads, head_dim).transpose(0, 1)
        scores = torch.bmm(q * head_dim**-0.5, k.transpose(1, 2))
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        elif is_causal:
            causal = torch.ones(length, src, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        if key_padding_mask is not None:
            scores = scores.view(batch, heads, length, src)
            if key_padding_mask.dtype == torch.bool:
                scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            else:
                scores = scores + key_padding_mask[:, None, None, :]
            scores = scores.view(batch * heads, length, src)
        weights = scores.softmax(-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(length, batch, inner)
        out = self.out_proj(out)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        weights = weights.view(batch, heads, length, src)
        if average_attn_weights:
            weights = weights.mean(1)
        if not batched:
            weights = weights.squeeze(0)
        return out, weights
