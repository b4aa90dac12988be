"""MAPO's token and sequence weights and its attention loss (DESIGN §3), as pure tensor functions.

Per-token tensors are [B, T] with completions left-aligned (column t holds completion token t+1) and a
bool/0-1 `mask` of real tokens; padded columns always get weight 0 and never produce NaN. Weights are
computed in float32 or wider (half-precision inputs are upcast), and the weights need no gradient:
Δh comes from a no-grad scoring pass.

Definitions (T_i = number of valid tokens of row i, t = 1..T_i their positions):
  relevance ω̃ ("soft", paper default): min(T_i·softmax_t(|Δh_t| / τ), C_mask), τ = τ_base·log(max(T_i, 2))
  targeting ν̃:   min(N_i·softmax_t(−|Δh_t| / τ), C_mask) over the N_i gated tokens, τ from T_i (the
                 same τ_T as ω̃; the paper's release does the same)
  temporal w_t:  (t/T_i)^κ and other schedules, see `temporal_weights`
  sequence g_i:  min(clamp(f_i, f_floor, 1)·s_i, C_pref), see `sequence_gate`
  L_attn = mean_i Σ_t g_i·w_t·ν̃_t·p_t·(−log(a_t + 1e−6)) / Σ_t p_t

Choices not fixed by the paper (defaults of the non-default mask kinds, tie breaks, rounding of the
top-ρ count) are stated where they are made.
"""

from __future__ import annotations

import math

import torch

from mapo.algos.losses import safe_divide
from mapo.data.prompt import ANSWER_CLOSE, ANSWER_OPEN

RELEVANCE_KINDS = ("soft", "threshold", "topk", "quantile")
TEMPORAL_SCHEDULES = ("power", "exp", "step", "constant")
LOG_EPS = 1e-6  # inside −log(a_t + ε) of the attention loss (DESIGN §3)


def _float(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as float32 or wider (weights from bf16 Δh would lose the softmax's resolution)."""
    if tensor.is_floating_point() and torch.finfo(tensor.dtype).bits >= 32:
        return tensor
    return tensor.float()


def _check_pair(name: str, tensor: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if tensor.dim() != 2 or tensor.shape != other.shape:
        raise ValueError(
            f"{name} and {other_name} must both be [B, T] with the same shape; "
            f"got {tuple(tensor.shape)} and {tuple(other.shape)}"
        )


def softmax_temperature(num_valid: torch.Tensor, tau_base: float) -> torch.Tensor:
    """τ = τ_base · log(max(n, 2)); n = valid completion tokens per row. max(·, 2) keeps τ > 0 for n ≤ 1.

    num_valid: [B] counts (any dtype). returns: [B] float.
    """
    return tau_base * torch.log(_float(num_valid).clamp_min(2.0))


def _capped_length_softmax(
    scores: torch.Tensor,
    valid: torch.Tensor,
    tau_base: float,
    cap: float | None,
    tau_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """min(n_i · softmax over row i's valid columns of (scores / τ_i), cap); 0 at invalid columns.

    scores: [B, T] float; valid: [B, T] bool; n_i = row i's valid count.
    tau_count: [B] the count τ_i = τ(tau_count_i) comes from (default n_i).
    returns: [B, T]. Mean weight over a row's valid tokens is 1 unless the cap binds. A row with no
    valid column is all 0 (finite everywhere, also in backward).
    """
    count = valid.sum(dim=-1).to(scores.dtype)  # [B]
    tau_from = count if tau_count is None else tau_count.to(scores.dtype)  # float64 stays float64
    tau = softmax_temperature(tau_from, tau_base).to(scores.dtype)  # [B]
    # finfo.min rather than −inf: an all-invalid row then softmaxes to a finite uniform row (zeroed
    # below) instead of 0/0 = NaN, so no NaN exists even in intermediates (anomaly checks stay quiet).
    logits = torch.where(valid, scores / tau.unsqueeze(-1), torch.finfo(scores.dtype).min)
    weights = count.unsqueeze(-1) * torch.softmax(logits, dim=-1)
    if cap is not None:
        weights = weights.clamp_max(cap)
    return torch.where(valid, weights, torch.zeros_like(weights))


def _top_fraction(scores: torch.Tensor, valid: torch.Tensor, rho: float) -> torch.Tensor:
    """Select the ceil(ρ·n) highest-scoring valid entries along the last dim (n = valid count there).

    scores: [..., L] float; valid: [..., L] bool. returns: [..., L] bool.
    Ties: a stable descending sort, so the earlier position wins. The count ceil(ρ·n) is computed in
    float64 with a 1e−6 slack so ρ·n that is an integer up to rounding (0.2·5) is not rounded up.
    """
    masked = torch.where(valid, scores, torch.full_like(scores, -torch.inf))
    order = torch.argsort(masked, dim=-1, descending=True, stable=True)  # [..., L]
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # rank[j] = place of entry j
    count = valid.sum(dim=-1, keepdim=True).double()
    keep = torch.ceil(rho * count - 1e-6).clamp_min(0)  # [..., 1]
    return valid & (rank < keep)


def relevance_weights(
    delta_h: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "soft",
    tau_base: float = 1.0,
    cap: float | None = 5.0,
    threshold: float = 0.5,
    floor: float = 0.1,
    rho: float = 0.2,
) -> torch.Tensor:
    """Modality relevance mask ω̃: how much each token's policy-gradient term counts.

    delta_h: [B, T] cross-modal differential entropy Δh_t (nats); values at padded columns are ignored.
    mask:    [B, T] bool or 0/1, valid completion tokens.
    kind:
      "soft" (paper default): ω̃_t = min(T_i·softmax_t(|Δh_t| / τ_T), cap), τ_T = tau_base·log(max(T_i, 2)),
              softmax over row i's valid tokens only (T_i of them). `cap` = C_mask (None: no cap).
      "threshold": 1 where |Δh_t| ≥ threshold, `floor` elsewhere.
      "topk":      1 for the ceil(ρ·T_i) valid tokens of row i with the largest |Δh_t|, `floor` elsewhere.
      "quantile":  1 for the ceil(ρ·N) valid tokens of the whole batch (N of them) with the largest
                   |Δh_t|, `floor` elsewhere. (Ties in topk/quantile: earlier position wins.)
    The defaults threshold = 0.5 nat, floor = 0.1 and ρ = 0.2 are ours, not the paper's.
    returns: [B, T] float ω̃; 0 at padded columns; a row with no valid token is all 0 (no NaN).
    """
    if kind not in RELEVANCE_KINDS:
        raise ValueError(f"relevance_weights: unknown kind {kind!r}; valid: {', '.join(RELEVANCE_KINDS)}")
    _check_pair("delta_h", delta_h, "mask", mask)
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"relevance_weights: rho must be in [0, 1], got {rho}")
    if tau_base <= 0:
        raise ValueError(f"relevance_weights: tau_base must be > 0, got {tau_base}")
    valid = mask.bool()
    magnitude = _float(delta_h).abs()

    if kind == "soft":
        return _capped_length_softmax(magnitude, valid, tau_base, cap)
    if kind == "threshold":
        selected = valid & (magnitude >= threshold)
    elif kind == "topk":
        selected = _top_fraction(magnitude, valid, rho)
    else:  # quantile over the batch: rank the flattened valid tokens together
        selected = _top_fraction(magnitude.reshape(-1), valid.reshape(-1), rho).reshape(valid.shape)
    ones, floors = torch.ones_like(magnitude), torch.full_like(magnitude, floor)
    return torch.where(valid, torch.where(selected, ones, floors), torch.zeros_like(magnitude))


def targeting_weights(
    delta_h: torch.Tensor,
    gate: torch.Tensor,
    mask: torch.Tensor | None = None,
    tau_base: float = 1.0,
    cap: float | None = 5.0,
) -> torch.Tensor:
    """Targeting weight ν̃ of the attention loss: favours gated tokens whose |Δh| is *small*.

    ν̃_t = min(N_i·softmax_t(−|Δh_t| / τ_T), cap) over row i's gated tokens (N_i of them), with
    τ_T = tau_base·log(max(T_i, 2)) and T_i the row's valid completion tokens (DESIGN §3: the same
    temperature as ω̃); `cap` = C_mask.
    delta_h: [B, T]; gate: [B, T] bool or 0/1, the token gate p_t: it selects the tokens of the softmax
             and gives N_i (intersected with `mask` when that is given).
    mask:    [B, T] bool or 0/1 valid completion tokens, whose count T_i sets τ. None: τ from N_i
             (only right when every valid token is gated).
    returns: [B, T] float; 0 where not gated; a row with no gated token is all 0.
    """
    _check_pair("delta_h", delta_h, "gate", gate)
    if tau_base <= 0:
        raise ValueError(f"targeting_weights: tau_base must be > 0, got {tau_base}")
    gated = gate.bool()
    tau_count = None
    if mask is not None:
        _check_pair("delta_h", delta_h, "mask", mask)
        gated = gated & mask.bool()  # a gated padding column would be a caller's bug; never weight it
        tau_count = mask.bool().sum(dim=-1)
    return _capped_length_softmax(-_float(delta_h).abs(), gated, tau_base, cap, tau_count)


def temporal_weights(
    mask: torch.Tensor, schedule: str = "power", kappa: float = 1.0, step_at: float = 0.5
) -> torch.Tensor:
    """Temporal weight w_t that grows along the completion (collapse happens late in the trace).

    With t = 1..T_i the position among row i's valid tokens and x = t / T_i ∈ (0, 1]:
      "power":    w = x^κ                                 (κ = 1: linear ramp ending at 1)
      "exp":      w = (exp(κ·x) − 1) / (exp(κ) − 1)       (0 → 1 convex for κ > 0; κ = 0: its limit x)
      "step":     w = 1[x ≥ step_at]                      (second half of the trace by default)
      "constant": w = 1
    mask: [B, T] bool or 0/1 valid tokens (t counts valid tokens, so the formula also holds if padding
          were not only on the right). returns: [B, T] float32; 0 at padded columns.
    """
    if schedule not in TEMPORAL_SCHEDULES:
        raise ValueError(
            f"temporal_weights: unknown schedule {schedule!r}; valid: {', '.join(TEMPORAL_SCHEDULES)}"
        )
    if mask.dim() != 2:
        raise ValueError(f"temporal_weights: mask must be [B, T], got shape {tuple(mask.shape)}")
    valid = mask.bool()
    ones = valid.float()
    position = ones.cumsum(dim=-1)  # [B, T], t at valid columns
    length = ones.sum(dim=-1, keepdim=True).clamp_min(1.0)  # [B, 1]; 1 for an empty row (no 0/0)
    x = position / length
    if schedule == "power":
        weights = x.pow(kappa)
    elif schedule == "exp":
        weights = x if kappa == 0 else torch.expm1(kappa * x) / math.expm1(kappa)
    elif schedule == "step":
        weights = (x >= step_at).float()
    else:
        weights = torch.ones_like(x)
    return torch.where(valid, weights, torch.zeros_like(weights))


def sequence_gate(
    failed: torch.Tensor,
    advantages: torch.Tensor,
    floor: float = 0.1,
    adv_eps: float = 0.02,
    cap: float = 3.0,
) -> torch.Tensor:
    """Sequence gate g_i of the attention loss: failed completions count fully, successes by `floor`.

    g_i = min(clamp(f_i, floor, 1)·s_i, cap) with f_i = 1[failed], s_i = max(|Â_i|, adv_eps) if failed
    else |Â_i| (so a failed completion in an all-failed group, Â = 0, still gets adv_eps).
    failed:     [B] bool or 0/1, 1[accuracy reward ≤ 0] (the caller decides what "failed" means).
    advantages: [B] Â_i. returns: [B] float, in [0, cap]; defaults f_floor = 0.1, ε_A = 0.02, C_pref = 3.
    """
    if failed.shape != advantages.shape or advantages.dim() != 1:
        raise ValueError(
            f"sequence_gate: failed and advantages must both be [B]; got {tuple(failed.shape)} "
            f"and {tuple(advantages.shape)}"
        )
    is_failed = failed.bool()
    magnitude = _float(advantages).abs()
    strength = torch.where(is_failed, magnitude.clamp_min(adv_eps), magnitude)
    failure = is_failed.to(magnitude.dtype).clamp(floor, 1.0)
    return (failure * strength).clamp_max(cap)


def attention_loss(
    audio_mass: torch.Tensor,
    mask: torch.Tensor,
    nu: torch.Tensor,
    w: torch.Tensor,
    gate_tokens: torch.Tensor,
    g: torch.Tensor,
    num_seqs: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """L_attn = (1/num_seqs) Σ_i Σ_t g_i·w_t·ν̃_t·p_t·(−log(a_t + 1e−6)) / Σ_t p_t,  p_t = gate_tokens ∧ mask.

    audio_mass:  [B, T] a_t, attention mass on the audio span at the query predicting y_t (with grad).
    mask:        [B, T] completion mask (bool or 0/1).
    nu:          [B, T] ν̃ (`targeting_weights`); w: [B, T] temporal weight (`temporal_weights`).
    gate_tokens: [B, T] token gate (bool or 0/1), e.g. `content_token_gate` or all ones.
    g:           [B] sequence gate (`sequence_gate`).
    num_seqs:    global number of sequences over ranks and micro-batches (default B, i.e. the mean over
                 this batch); as in `losses.aggregate`, summing micro-batch results then equals the
                 whole batch's loss.
    Gradient flows into every argument that requires it; in training only audio_mass does.
    returns: 0-d tensor. Rows with Σ_t p_t = 0 contribute 0; non-finite values outside p are ignored.
    """
    for name, tensor in (("mask", mask), ("nu", nu), ("w", w), ("gate_tokens", gate_tokens)):
        _check_pair("audio_mass", audio_mass, name, tensor)
    if g.shape != audio_mass.shape[:1]:
        raise ValueError(f"attention_loss: g must be [B] = {tuple(audio_mass.shape[:1])}, got {tuple(g.shape)}")
    gated = gate_tokens.bool() & mask.bool()  # [B, T] p_t
    mass = _float(audio_mass)
    per_token = g.unsqueeze(-1) * w * nu * -torch.log(mass + LOG_EPS)  # [B, T]
    per_token = torch.where(gated, per_token, torch.zeros_like(per_token))
    count = gated.sum(dim=-1).to(per_token.dtype)  # [B]
    per_row = per_token.sum(dim=-1) / count.clamp_min(1.0)  # [B]; an ungated row is 0/1 = 0
    return safe_divide(per_row.sum(), audio_mass.shape[0] if num_seqs is None else num_seqs)


# --- token gate p_t: content tokens only ------------------------------------------------------------


def content_token_gate(token_ids: torch.Tensor, content_vocab_mask: torch.Tensor) -> torch.Tensor:
    """p_t for "content tokens only": look each completion token up in a per-vocabulary flag table.

    token_ids: [B, T] int completion token ids (padding may hold any id, e.g. pad or −100).
    content_vocab_mask: [V] bool (`build_content_vocab_mask`). Ids outside [0, V) are not content.
    returns: [B, T] bool. Combine with the completion mask (attention_loss does).
    """
    if content_vocab_mask.dim() != 1 or content_vocab_mask.dtype != torch.bool:
        raise ValueError(
            f"content_vocab_mask must be a 1-D bool [V] tensor, got {content_vocab_mask.dtype} "
            f"{tuple(content_vocab_mask.shape)}"
        )
    vocab = content_vocab_mask.shape[0]
    in_range = (token_ids >= 0) & (token_ids < vocab)
    return content_vocab_mask[token_ids.clamp(0, vocab - 1)] & in_range


def _format_tag_token_ids(tokenizer, tags: tuple[str, ...]) -> set[int]:
    """Ids of tokens that cover any character of a format tag, in the contexts a tag appears in.

    Byte-level BPE merges a tag with its neighbours differently by context ('<answer>' → '<', 'answer',
    '>'; ' <answer>' → 'Ġ<', 'answer', '>'), so each tag is encoded after and before a few typical
    characters and every token whose character span overlaps the tag is collected.
    """
    contexts = ("", " ", "\n", ".", "a", "A", "1", ")")
    ids: set[int] = set()
    for tag in tags:
        for before in contexts:
            for after in contexts:
                text = f"{before}{tag}{after}"
                encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                start, end = len(before), len(before) + len(tag)
                for token_id, (lo, hi) in zip(encoded["input_ids"], encoded["offset_mapping"]):
                    if lo < end and hi > start:
                        ids.add(int(token_id))
    return ids


def build_content_vocab_mask(
    tokenizer, vocab_size: int | None = None, format_tags: tuple[str, ...] = (ANSWER_OPEN, ANSWER_CLOSE)
) -> torch.Tensor:
    """Which vocabulary entries are content tokens, for `content_token_gate`.

    A token is content when (1) its decoded text contains a letter or digit (`str.isalnum`, so any
    script counts; punctuation and whitespace do not), (2) it is not a special/added-special token
    (e.g. <|im_end|>, <|AUDIO|>), and (3) it is not a piece of a format tag such as "<answer>" or
    "</answer>" in any of the contexts tried by `_format_tag_token_ids`.
    Known limits: a token decoded alone from a partial UTF-8 sequence shows as '\ufffd' and is not
    content; a bare piece like 'answer' (no leading space) is a tag piece, so that spelling of the
    word in the text is not content either (' answer' with its space still is).

    tokenizer: a fast Hugging Face tokenizer (needs batch_decode, offsets mapping, all_special_ids).
    vocab_size: length of the returned mask, normally the model's embedding rows (≥ len(tokenizer));
                ids past the tokenizer are not content. Default len(tokenizer).
    returns: [V] bool, on CPU (move it to the device once).
    """
    tokenizer_size = len(tokenizer)
    size = tokenizer_size if vocab_size is None else vocab_size
    if size < tokenizer_size:
        raise ValueError(f"build_content_vocab_mask: vocab_size={size} < len(tokenizer)={tokenizer_size}")
    texts = tokenizer.batch_decode([[i] for i in range(tokenizer_size)])
    excluded = set(tokenizer.all_special_ids)
    excluded |= {i for i, added in tokenizer.added_tokens_decoder.items() if added.special}
    excluded |= _format_tag_token_ids(tokenizer, format_tags)
    flags = [i not in excluded and any(ch.isalnum() for ch in text) for i, text in enumerate(texts)]
    flags += [False] * (size - tokenizer_size)
    return torch.tensor(flags, dtype=torch.bool)
