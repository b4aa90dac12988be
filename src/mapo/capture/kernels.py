"""Per-head attention mass on the audio keys, from one layer's query and key states.

Three ways to compute the same number (DESIGN §4):

- `audio_mass_eager`: the reference. Builds softmax(QKᵀ·scale + mask) — a [B, Hq, Q, S] tensor — and
  sums it over the audio keys.
- `audio_mass_sdpa`: the fast one. The mass on a key span is softmax(QKᵀ·scale + mask) @ v with v the
  0/1 indicator of the span, so one `scaled_dot_product_attention` call with the indicator as "value"
  returns it with O(B·H·Q·w) extra memory (w = value width, see `default_indicator_width`); fused
  kernels never materialise the Q×S matrix.
- `fused_inputs` + `split_fused_output`: the indicator rides along in the layer's *own* attention call.
  Query and key get `FUSED_EXTRA_WIDTH` zero channels (their dot products are unchanged), the value gets
  the indicator in its first extra channel, so one call returns the layer's attention output and the mass
  together: no second Q·Kᵀ, softmax or backward. The model's outputs equal the uncaptured ones up to
  floating-point rounding (a kernel on a wider head may sum in another order); the other two methods leave
  them bit-identical.

Both take the attention mask exactly as a transformers attention function receives it (`None` =
plain causal via SDPA's `is_causal`, a boolean mask with True = attend, or an additive float mask with
`finfo.min` = blocked), so they see the model's padding + causal pattern, and both are differentiable
in `query` and `key`.

A query row whose keys are *all* blocked (a left-padding position) has no defined attention; its mass
is reported as 0 with zero gradient. The row is unblocked inside the computation first, because a
fully blocked softmax row is NaN in some kernels and a NaN there would poison the key gradient of the
whole batch even when the row itself is later discarded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F



#: Zero channels the fused method appends to query, key and value (the value's first one holds the
#: indicator). 8 keeps CUDA kernels' head widths a multiple of 8, which they require; whether the wider head
#: still runs fast is `fused_capture_pays`' question (Qwen2-Audio's 128 becomes 136, off the fast path).
FUSED_EXTRA_WIDTH = 8

#: On CUDA, the widest head (query/key and value) for which PyTorch's fused attention kernels stay on their
#: fast path: the memory-efficient kernel, the one a masked (padded) call takes, is built for widths ≤ 128 and
#: beyond that runs a generic, much slower variant. Measured on an H200 (2026-11-28, one layer's attention at
#: 7B head shapes, S = 4096, padded, forward + backward, `experiments/gpu/followup_20261128.py`): heads of 128
#: widened to 136 made the fused capture cost 2.66× the uncaptured attention against the second call's
#: 1.79×; heads of 120 widened to 128, 1.10× against 1.84×.
CUDA_FAST_HEAD_WIDTH = 128


def fused_capture_pays(device_type: str, head_dim: int, value_dim: int | None = None,
                       width: int = FUSED_EXTRA_WIDTH) -> bool:
    """Whether the fused capture is the cheaper method for heads of `head_dim` (and `value_dim`) on a device
    of `device_type`: on CUDA only while the widened heads stay within CUDA_FAST_HEAD_WIDTH (so for
    Qwen2-Audio's and the Omni thinkers' 128-wide heads the second call wins there), elsewhere always (on
    CPU the fused call cost 1.09× at 7B head shapes against the second call's 1.98×)."""
    widest = max(head_dim, head_dim if value_dim is None else value_dim) + width
    return device_type != "cuda" or widest <= CUDA_FAST_HEAD_WIDTH


def default_indicator_width(query: torch.Tensor) -> int:
    """Width of the indicator "value" that keeps SDPA on a fused kernel (no Q×S matrix).

    CUDA: 8 — the memory-efficient kernel takes a value width different from the query's (a multiple
    of 8), and is the kernel a padded (masked) batch gets anyway. CPU: the query head size — the CPU
    flash kernel requires equal q/k/v widths, and any other width falls back to the math kernel,
    which materialises the Q×S weights.
    """
    return 8 if query.device.type == "cuda" else query.shape[-1]


def _repeat_kv(states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, S, d] -> [B, Hkv·n_rep, S, d]; query head h uses kv head h // n_rep (as in transformers)."""
    if n_rep == 1:
        return states
    batch, kv_heads, seq, dim = states.shape
    return states[:, :, None].expand(batch, kv_heads, n_rep, seq, dim).reshape(batch, kv_heads * n_rep, seq, dim)


def _blocked_rows(attention_mask: torch.Tensor) -> torch.Tensor:
    """Query rows in which no key may be attended.

    attention_mask: [B|1, 1|H, Q, S], bool (True = attend) or additive float (finfo.min or -inf = blocked).
    Returns [B|1, 1|H, Q] bool, True where the whole row is blocked.
    """
    if attention_mask.dtype == torch.bool:
        return ~attention_mask.any(dim=-1)
    return ~(attention_mask > torch.finfo(attention_mask.dtype).min).any(dim=-1)


def _check_inputs(query: torch.Tensor, key: torch.Tensor, audio_keys: torch.Tensor) -> int:
    """Validate shapes; return the number of query heads per kv head."""
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(
            f"query and key must be [B, H, len, d]; got query {tuple(query.shape)}, key {tuple(key.shape)}"
        )
    batch, q_heads, _, _ = query.shape
    _, kv_heads, key_len, _ = key.shape
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    if audio_keys.shape != (batch, key_len):
        raise ValueError(
            f"audio_key_mask must be [B, S] = [{batch}, {key_len}] to match the keys; got {tuple(audio_keys.shape)}"
        )
    return q_heads // kv_heads


def _causal_mask(q_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """[1, 1, Q, S] bool, top-left aligned like SDPA's `is_causal` (query i sees keys 0..i)."""
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(key_len, device=device)[None, :]
    return (cols <= rows)[None, None]


def audio_mass_eager(
    query: torch.Tensor,
    key: torch.Tensor,
    audio_keys: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    is_causal: bool = True,
) -> torch.Tensor:
    """Reference audio mass from the full attention weights.

    query: [B, Hq, Q, d] (after rotary), key: [B, Hkv, S, d] (after rotary, cache included),
    audio_keys: [B, S] bool (True on audio keys), attention_mask: None, bool or additive float
    [B|1, 1|H, Q, S]; `is_causal` only matters when the mask is None (then, as in SDPA, the pattern is
    causal iff `is_causal and Q > 1`). Softmax is taken in float32 like transformers' eager attention.
    Returns [B, Hq, Q] float32: Σ_{k audio} softmax_k(q·k·scaling + mask); 0 on fully blocked rows.
    """
    n_rep = _check_inputs(query, key, audio_keys)
    q_len, key_len = query.shape[2], key.shape[2]
    if attention_mask is None and is_causal and q_len > 1:
        attention_mask = _causal_mask(q_len, key_len, query.device)

    scores = torch.matmul(query, _repeat_kv(key, n_rep).transpose(2, 3)).float() * scaling
    blocked = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            # finfo.min (not -inf) keeps a fully blocked row finite: it becomes uniform and is zeroed below.
            bias = torch.where(attention_mask, 0.0, torch.finfo(torch.float32).min)
        else:
            bias = attention_mask.float()
        scores = scores + bias
        blocked = _blocked_rows(attention_mask)
    weights = torch.softmax(scores, dim=-1)  # [B, Hq, Q, S]
    mass = torch.matmul(weights, audio_keys.to(weights.dtype)[:, None, :, None]).squeeze(-1)
    if blocked is not None:
        mass = mass.masked_fill(blocked, 0.0)
    return mass


def audio_mass_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    audio_keys: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    is_causal: bool = True,
    value_width: int | None = None,
) -> torch.Tensor:
    """Audio mass through one SDPA call whose value is the audio-key indicator (no Q×S tensor here).

    Same arguments and result as `audio_mass_eager`: query [B, Hq, Q, d], key [B, Hkv, S, d],
    audio_keys [B, S] bool, attention_mask None | bool | additive float [B|1, 1|H, Q, S].
    value_width: width of the indicator value (default `default_indicator_width(query)`).
    Returns [B, Hq, Q] float32. The SDPA runs in the query's dtype (bf16 on GPU keeps the fused kernels).
    """
    n_rep = _check_inputs(query, key, audio_keys)
    batch, _, q_len, _ = query.shape
    key_len = key.shape[2]

    # Value: the indicator in channel 0, zeros in the rest; one copy per kv head (the same for each).
    width = default_indicator_width(query) if value_width is None else value_width
    value = query.new_zeros(batch, 1, key_len, width)
    value[:, 0, :, 0] = audio_keys.to(query.dtype)

    blocked = None
    sdpa_kwargs: dict = {}
    causal = False
    if attention_mask is None:
        causal = is_causal and q_len > 1
        if causal and key_len > q_len:
            # SDPA's is_causal is top-left aligned, so keys past Q are invisible anyway; transformers
            # crops them the same way (prefill into an empty static cache).
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        if n_rep > 1:
            # Without a mask the fused kernels take grouped heads directly, saving the repeated keys.
            sdpa_kwargs["enable_gqa"] = True
            value = value.expand(batch, key.shape[1], -1, -1)
        else:
            value = value.expand(batch, query.shape[1], -1, -1)
    else:
        blocked = _blocked_rows(attention_mask)
        if attention_mask.dtype == torch.bool:
            attention_mask = attention_mask | blocked[..., None]
        else:
            attention_mask = attention_mask.masked_fill(blocked[..., None], 0.0).to(query.dtype)
        # Masked GQA falls back to the math kernel (which builds Q×S) on CUDA: repeat the keys instead.
        key = _repeat_kv(key, n_rep)
        value = value.expand(batch, query.shape[1], -1, -1)

    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, is_causal=causal, **sdpa_kwargs
    )  # [B, Hq, Q, width]
    mass = out[..., 0].float()
    if blocked is not None:
        mass = mass.masked_fill(blocked, 0.0)
    return mass


def fused_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, audio_keys: torch.Tensor,
    width: int = FUSED_EXTRA_WIDTH,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value widened for the fused capture, to go through the layer's own attention function.

    query [B, Hq, Q, d], key [B, Hkv, S, d], value [B, Hkv, S, dv], audio_keys [B, S] bool.
    Returns query [B, Hq, Q, d+w] and key [B, Hkv, S, d+w] with zeros in the new channels (so q·k, hence the
    softmax, is unchanged; the caller must pass the original scaling, since a kernel's default would use the
    new width), and value [B, Hkv, S, dv+w] with the audio indicator in channel dv and zeros after it.
    The attention output's channel dv is then Σ_{k audio} α_{q,k}, differentiable in query and key.
    """
    _check_inputs(query, key, audio_keys)
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value must be [B, Hkv, S, dv] like key {tuple(key.shape)}; got {tuple(value.shape)}")
    indicator = value.new_zeros(*value.shape[:-1], width)
    indicator[..., 0] = audio_keys[:, None, :].to(value.dtype)
    return (
        torch.cat([query, query.new_zeros(*query.shape[:-1], width)], dim=-1),
        torch.cat([key, key.new_zeros(*key.shape[:-1], width)], dim=-1),
        torch.cat([value, indicator], dim=-1),
    )


def split_fused_output(
    output: torch.Tensor, value_width: int, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The widened attention output of `fused_inputs`, in transformers' attention-function layout
    [B, Q, Hq, dv+w], -> (the layer's attention output [B, Q, Hq, dv] (a view), mass [B, Hq, Q] float32).

    attention_mask: the mask the attention function got (None | bool | additive float [B|1, 1|H, Q, S]);
    a query row with every key blocked gets mass 0 and no gradient, as in the other methods.
    """
    mass = output[..., value_width].transpose(1, 2).float()
    if attention_mask is not None:
        mass = mass.masked_fill(_blocked_rows(attention_mask), 0.0)
    return output[..., :value_width], mass
