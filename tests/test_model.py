"""Model properties: causality, padding invariance, gradients, loss masking; the kv-cache rollout
(dtlab.kv_cache) against a token-by-token reference; the CPU kernels (dtlab.kernels)."""

from dataclasses import replace

import pytest
import torch

from dtlab.config import ModelConfig
from dtlab.errors import ConfigError
from dtlab.kv_cache import KVCache, predict_cached
from dtlab.model import DecisionTransformer
from dtlab.spaces import ContinuousActions, VectorObservations
from dtlab.losses import action_loss
from dtlab.trainer import param_groups

CFG = ModelConfig(embed_dim=32, n_layers=2, n_heads=2, context_len=6, max_ep_len=50, dropout=0.0)


def inputs(b=3, k=6, obs_dim=5, act_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, obs_dim, generator=g), torch.rand(b, k, act_dim, generator=g) * 2 - 1,
            torch.randn(b, k, 1, generator=g), torch.arange(k).repeat(b, 1) + 3)


def model(seed=0):
    torch.manual_seed(seed)
    return DecisionTransformer(CFG, VectorObservations(5), ContinuousActions(2)).eval()


def test_future_tokens_do_not_change_earlier_predictions():
    m = model()
    obs, act, rtg, ts = inputs()
    base = m(obs, act, rtg, ts)
    for t in range(CFG.context_len):
        obs2, act2, rtg2 = obs.clone(), act.clone(), rtg.clone()
        obs2[:, t + 1:] += 5.0
        rtg2[:, t + 1:] -= 3.0
        act2[:, t:] = -act2[:, t:]  # a_t comes after s_t: it must not change the prediction of a_t
        out = m(obs2, act2, rtg2, ts)
        torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
        if t + 1 < CFG.context_len:
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])  # the change is visible later


def test_left_padding_gives_the_same_last_action():
    m = model()
    obs, act, rtg, ts = inputs(b=1, k=3)
    short = m(obs, act, rtg, ts)[:, -1]  # an unpadded 3-step window
    pad = CFG.context_len - 3
    masks = torch.tensor([[False] * pad + [True] * 3])
    garbage = lambda x: torch.cat([torch.full((1, pad, *x.shape[2:]), 7.0, dtype=x.dtype), x], 1)  # noqa
    padded = m(garbage(obs), garbage(act), garbage(rtg), torch.cat([torch.zeros(1, pad, dtype=torch.long), ts], 1),
               masks)
    torch.testing.assert_close(padded[:, -1], short, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded[:, pad:], m(obs, act, rtg, ts), rtol=0, atol=1e-5)
    assert torch.isfinite(padded).all()  # padded rows are finite too


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    m = DecisionTransformer(ModelConfig(embed_dim=16, n_layers=2, context_len=4, max_ep_len=20),
                            VectorObservations(5), ContinuousActions(2))
    obs, act, rtg, ts = inputs(k=4)
    masks = torch.tensor([[False, True, True, True]] * 3)
    loss = action_loss(m(obs, act, rtg, ts, masks), act, masks)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_ignores_padded_positions():
    pred = torch.tensor([[[0.5], [0.0], [1.0]]])
    target = torch.tensor([[[100.0], [1.0], [0.0]]])
    masks = torch.tensor([[False, True, True]])
    # Mean over the two real positions: ((0-1)^2 + (1-0)^2) / 2 = 1.
    assert action_loss(pred, target, masks).item() == 1.0


def test_weight_decay_only_on_linear_weights():
    m = model()
    decay, no_decay = param_groups(m, 0.1)
    n_linear = sum(1 for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    assert len(decay["params"]) == n_linear
    assert any(p is m.embed_timestep.weight for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == \
        sum(p.numel() for p in m.parameters())


def test_predict_last_equals_full_forward():
    m = model()
    obs, act, rtg, ts = inputs(b=4)
    torch.testing.assert_close(m.predict_last(obs, act, rtg, ts), m(obs, act, rtg, ts)[:, -1],
                               rtol=0, atol=1e-6)
    masks = torch.tensor([[False, False, True, True, True, True]] * 2 + [[True] * 6] * 2)
    torch.testing.assert_close(m.predict_last(obs, act, rtg, ts, masks), m(obs, act, rtg, ts, masks)[:, -1],
                               rtol=0, atol=1e-6)


def naive_forward(m, obs, act, rtg, ts, masks=None):
    """Every block over every token, then the state tokens' outputs (no readout shortcut)."""
    b, k, _ = obs.shape
    x = m.embed(obs, act, rtg, ts)
    attn_mask = None if masks is None else m.attention_mask(masks)
    for block in m.blocks:
        x = block(x, attn_mask)
    return m.predict_action(m.ln_f(x).reshape(b, k, 3, -1)[:, :, 1])


def test_forward_readout_equals_computing_every_token():
    m = model()
    obs, act, rtg, ts = inputs(b=4)
    masks = torch.tensor([[False, False, True, True, True, True]] * 2 + [[True] * 6] * 2)
    for mk in (None, masks):
        torch.testing.assert_close(m(obs, act, rtg, ts, mk), naive_forward(m, obs, act, rtg, ts, mk),
                                   rtol=0, atol=1e-6)
    # Gradients too (training differentiates the shortcut path).
    m.train()
    torch.manual_seed(5)
    g1 = torch.autograd.grad(m(obs, act, rtg, ts, masks).sum(), list(m.parameters()),
                             allow_unused=True)
    torch.manual_seed(5)
    g2 = torch.autograd.grad(naive_forward(m, obs, act, rtg, ts, masks).sum(), list(m.parameters()),
                             allow_unused=True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_timesteps_beyond_max_ep_len_are_an_error_not_clamped():
    m = model()
    obs, act, rtg, ts = inputs(b=2)
    late = ts.clone()
    late[1, -1] = CFG.max_ep_len  # one past the last embedded timestep
    message = (r"^timestep 50 is beyond the model's max_ep_len=50 \(it embeds timesteps 0 to 49\); "
               r"cap episodes at 50 steps with max_steps$")
    for call in (lambda: m(obs, act, rtg, late), lambda: m.predict_last(obs, act, rtg, late),
                 lambda: predict_cached(m, obs, act, rtg, late)):
        with pytest.raises(ConfigError, match=message):
            call()
    ok = ts.clone()
    ok[1, -1] = CFG.max_ep_len - 1
    assert torch.isfinite(m(obs, act, rtg, ok)).all()


def sliding_reference(m, obs, act, rtg, ts):
    """The kv-cache rollout's definition, token by token with plain loops (independent of the
    ring buffer): every token's keys and values are computed once per layer, from that layer's
    input when the token arrives; the tokens of step t (a_{t-1}, R_t, s_t) attend to the tokens of
    steps t - K + 1 .. t (R_{t-K+1} onwards) up to themselves. Returns the action read from each
    s_t: (B, T, A)."""
    b, steps = obs.shape[:2]
    d, heads, k = m.cfg.embed_dim, m.cfg.n_heads, m.cfg.context_len
    tokens = m.embed(obs, act, rtg, ts)  # (B, 3T, D): R_0, s_0, a_0, R_1, ...
    keys = [[] for _ in m.blocks]  # per layer: one (B, H, D/H) per token so far
    values = [[] for _ in m.blocks]
    preds = []
    for t in range(steps):
        new = [3 * t - 1, 3 * t, 3 * t + 1] if t else [0, 1]  # a_{t-1}, R_t, s_t
        first = max(0, 3 * (t - k + 1))  # R_{t-K+1}
        h = {n: tokens[:, n] for n in new}  # (B, D) each
        for i, block in enumerate(m.blocks):
            qs = {}
            for n in new:  # keys and values of every new token first, in token order
                q, kk, vv = block.attn.qkv(block.ln_1(h[n])).split(d, dim=-1)
                qs[n] = q.view(b, heads, d // heads)
                keys[i].append(kk.view(b, heads, d // heads))
                values[i].append(vv.view(b, heads, d // heads))
            for n in new:
                seen = range(first, n + 1)
                kk = torch.stack([keys[i][j] for j in seen], dim=2)  # (B, H, L, D/H)
                vv = torch.stack([values[i][j] for j in seen], dim=2)
                w = torch.softmax((qs[n][:, :, None] * kk).sum(-1) / (d // heads) ** 0.5, dim=-1)
                y = (w[..., None] * vv).sum(2).reshape(b, d)  # (B, D)
                x = h[n] + block.attn.proj(y)
                h[n] = x + block.mlp(block.ln_2(x))
        preds.append(m.predict_action(m.ln_f(h[3 * t + 1])))
    return torch.stack(preds, dim=1)  # (B, T, A)


@torch.no_grad()
def test_cached_steps_equal_exact_recomputation_within_the_first_k_steps():
    """predict_cached (first call: the whole short episode; then the cache plus one new step)
    equals predict_last on the same steps while the episode fits in the window; once it slides it
    equals the token-by-token reference above and keeps the newest K steps (3K - 1 tokens)."""
    m = model()
    for p in m.parameters():  # weights larger than the init's: the approximation shows clearly
        p.normal_(0.0, 0.3)
    k = CFG.context_len
    obs, act, rtg, _ = inputs(b=2, k=3 * k + 2, seed=1)
    ts = torch.arange(3 * k + 2).repeat(2, 1)
    reference = sliding_reference(m, obs, act, rtg, ts)
    cache, slid = None, []
    for t in range(3 * k + 2):
        if cache is None:
            pred, cache = predict_cached(m, obs[:, :1], act[:, :1], rtg[:, :1], ts[:, :1])
        else:
            pred, cache = predict_cached(m, obs[:, t - 1:t + 1], act[:, t - 1:t + 1],
                                         rtg[:, t - 1:t + 1], ts[:, t - 1:t + 1], cache)
        assert isinstance(cache, KVCache) and cache.steps == min(t + 1, k)
        held = sorted(int(p) for p in cache.positions if p >= 0)  # the window's tokens, no more
        assert held == list(range(cache.tokens - (3 * cache.steps - 1), cache.tokens))
        torch.testing.assert_close(pred, reference[:, t], rtol=0, atol=1e-5)
        first = max(0, t + 1 - k)
        exact = m.predict_last(obs[:, first:t + 1], act[:, first:t + 1], rtg[:, first:t + 1],
                               ts[:, first:t + 1])
        if t < k:
            torch.testing.assert_close(pred, exact, rtol=0, atol=1e-5)
        else:
            slid.append(float((pred - exact).abs().max()))
    assert min(slid) > 1e-3  # approximate once the window slid (older keys saw older context)
    torch.testing.assert_close(cache.select(torch.tensor([1])).keys[0], cache.keys[0][1:])


@torch.no_grad()
def test_cache_rebuilt_late_in_an_episode_and_window_edge_cases():
    """A cache built from K steps in mid-episode (a policy rebuilds it after steering), continued
    past two wraps of the ring, follows the reference from those steps; a first call with more
    than K steps equals one with the newest K; K = 1 stays exact (its window is the current step);
    rows selected from a cache (not contiguous) continue as a cache of those rows alone; on the
    CPU the buffers stay fp32 under bf16 autocast."""
    m = model()
    for p in m.parameters():
        p.normal_(0.0, 0.3)
    k, steps, start = CFG.context_len, 4 * CFG.context_len, 5
    obs, act, rtg, _ = inputs(b=3, k=steps, seed=2)
    ts = torch.arange(steps).repeat(3, 1) + 7
    reference = sliding_reference(m, obs[:, start:], act[:, start:], rtg[:, start:], ts[:, start:])
    end = start + k
    pred, cache = predict_cached(m, obs[:, start:end], act[:, start:end], rtg[:, start:end],
                                 ts[:, start:end])
    torch.testing.assert_close(pred, reference[:, k - 1], rtol=0, atol=1e-5)
    longer, _ = predict_cached(m, obs[:, start - 2:end], act[:, start - 2:end],
                               rtg[:, start - 2:end], ts[:, start - 2:end])
    torch.testing.assert_close(longer, pred, rtol=0, atol=1e-6)
    rows = torch.tensor([0, 2])
    picked = None
    for t in range(end, steps):
        two = slice(t - 1, t + 1)
        if t == end + 3:  # rows 0 and 2 go on alone, in a copy of their rows
            picked = cache.select(rows)
        pred, cache = predict_cached(m, obs[:, two], act[:, two], rtg[:, two], ts[:, two], cache)
        torch.testing.assert_close(pred, reference[:, t - start], rtol=0, atol=1e-5)
        if picked is not None:
            alone, picked = predict_cached(m, obs[rows, two], act[rows, two], rtg[rows, two],
                                           ts[rows, two], picked)
            torch.testing.assert_close(alone, pred[rows], rtol=0, atol=1e-6)

    one = DecisionTransformer(replace(CFG, context_len=1), VectorObservations(5),
                              ContinuousActions(2)).eval()
    pred, cache = predict_cached(one, obs[:, :1], act[:, :1], rtg[:, :1], ts[:, :1])
    for t in range(1, 6):
        two = slice(t - 1, t + 1)
        pred, cache = predict_cached(one, obs[:, two], act[:, two], rtg[:, two], ts[:, two], cache)
        exact = one.predict_last(obs[:, t:t + 1], act[:, t:t + 1], rtg[:, t:t + 1], ts[:, t:t + 1])
        torch.testing.assert_close(pred, exact, rtol=0, atol=1e-6)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, cache = predict_cached(m, obs[:, :2], act[:, :2], rtg[:, :2], ts[:, :2])
    assert all(key.dtype == torch.float32 for key in cache.keys + cache.values)


# ---- dropout as dtlab draws it on the CPU (kernels.dropout, kernels.attention) ------------------
def test_dropout_matches_a_mask_drawn_from_the_same_uniform_numbers():
    from dtlab.kernels import dropout

    x = torch.randn(64, 60, 128, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.1, True)
    torch.manual_seed(3)
    keep = torch.rand(x.shape) >= 0.1  # the reference mask, drawn independently of the code
    assert torch.equal(y != 0, keep)  # x has no zeros
    assert torch.allclose(y, torch.where(keep, x / 0.9, torch.zeros_like(x)), rtol=1e-6, atol=0)
    y.sum().backward()
    assert torch.allclose(x.grad, keep.float() / 0.9)
    # 491,520 draws: the fraction dtlab dropped within 5 standard deviations of p (sd 0.00043),
    # so p is the probability of dropping, not of keeping.
    assert abs((y == 0).float().mean().item() - 0.1) < 5 * (0.1 * 0.9 / y.numel()) ** 0.5
    assert torch.equal(dropout(x, 0.1, False), x)
    assert torch.equal(dropout(x, 0.0, True), x)
    assert dropout(x.detach().bfloat16(), 0.1, True).dtype == torch.bfloat16


def test_attention_with_dropout_matches_the_naive_formula():
    from dtlab.kernels import attention

    torch.manual_seed(0)
    b, h, t, e = 4, 2, 9, 8
    q, k, v = (torch.randn(b, h, t, e) for _ in range(3))
    mask = torch.ones(t, t, dtype=torch.bool).tril() & (torch.rand(b, 1, 1, t) > 0.3)
    mask = mask | torch.eye(t, dtype=torch.bool)  # (B, 1, T, T), every row attends to itself
    torch.manual_seed(5)
    got = attention(q, k, v, mask, is_causal=False, dropout_p=0.25)
    torch.manual_seed(5)
    scores = torch.einsum("bhqe,bhke->bhqk", q, k) / e ** 0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    keep = torch.rand(probs.shape) >= 0.25
    want = torch.einsum("bhqk,bhke->bhqe", probs * keep / 0.75, v)
    assert torch.allclose(got, want, atol=1e-6)
    torch.manual_seed(7)
    causal = attention(q, k, v, None, is_causal=True, dropout_p=0.25)
    torch.manual_seed(7)
    explicit = attention(q, k, v, torch.ones(t, t, dtype=torch.bool).tril(), is_causal=False,
                         dropout_p=0.25)
    assert torch.equal(causal, explicit)


def test_written_out_attention_equals_sdpa_when_its_dropout_keeps_everything(monkeypatch):
    """The CPU path taken with dropout on, its masks replaced by the identity, against SDPA
    without dropout: with a padding mask and causal; and in fp32 under bf16 autocast."""
    import dtlab.kernels as kernels_module
    from dtlab.kernels import attention

    torch.manual_seed(0)
    b, h, t, e = 3, 2, 7, 16
    q, k, v = (torch.randn(b, h, t, e) for _ in range(3))
    mask = (torch.ones(t, t, dtype=torch.bool).tril() & (torch.rand(b, 1, 1, t) > 0.3)) | torch.eye(t, dtype=torch.bool)
    monkeypatch.setattr(kernels_module, "dropout", lambda x, p, training: x)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert torch.allclose(attention(q, k, v, mask, is_causal=False, dropout_p=0.5),
                          sdpa(q, k, v, attn_mask=mask), atol=1e-6)
    assert torch.allclose(attention(q, k, v, None, is_causal=True, dropout_p=0.5),
                          sdpa(q, k, v, is_causal=True), atol=1e-6)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(qb, kb, vb, mask, is_causal=False, dropout_p=0.5)
    assert got.dtype == torch.bfloat16
    want = sdpa(qb.float(), kb.float(), vb.float(), attn_mask=mask)  # fp32 from the same inputs
    assert torch.allclose(got.float(), want, atol=1e-2)  # bf16 output rounding only


def test_weight_decay_help_names_what_param_groups_decays(capsys, monkeypatch):
    """--weight-decay's help lists the embeddings that are decayed (state, return, continuous
    action: Linear maps) apart from those that are not (timestep, discrete action: tables), and
    param_groups agrees for a continuous and a discrete model."""
    from dtlab.cli import main
    from dtlab.spaces import DiscreteActions

    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    words = " ".join(capsys.readouterr().out.replace("│", " ").split())
    text = words.split("--weight-decay FLOAT", 1)[1].split("--betas", 1)[0]
    decayed_text, _, undecayed_text = text.partition("; not on")
    assert "state, return and continuous-action embeddings" in decayed_text
    assert "timestep embedding" in undecayed_text and "discrete-action embedding" in undecayed_text
    cont = model()
    disc = DecisionTransformer(CFG, VectorObservations(5), DiscreteActions(3))
    for m, decayed, undecayed in ((cont, ("embed_state", "embed_return", "embed_action"),
                                   ("embed_timestep",)),
                                  (disc, ("embed_state", "embed_return"),
                                   ("embed_timestep", "embed_action"))):
        decay = {id(p) for p in param_groups(m, 0.1)[0]["params"]}
        for name in decayed:
            assert id(getattr(m, name).weight) in decay, name
        for name in undecayed:
            assert id(getattr(m, name).weight) not in decay, name
