"""Expert pruning results checked against references computed independently of hf_prune.

- The load-balancing loss of the per-layer-count (``hf_prune_<family>``) classes: with equal counts it is
  the stock class's own ``aux_loss`` on the same weights; with different counts it is the Switch
  Transformer formula written out here by hand (every layer's router logits recomputed from its input,
  missing experts counting as never chosen), pad tokens excluded.
- DiEP: the first α step and the first β step equal plain SGD on the objective of METHODS.md, its
  gradient taken by a separately written autograd computation (own routing hooks, own cross-entropy,
  MoE inputs/outputs captured by own hooks); the scores are |α|·β of those values.
"""

from __future__ import annotations

import pytest
import torch
from hf_prune.model_patches import nonuniform_moe
from tiny_models import MOE_TYPES, build_tiny_model, build_tokenizer, randomize_, write_calibration_file

from hf_prune.adapters import get_adapter
from hf_prune.calibration import CalibrationBatch
from hf_prune.context import PruneContext
from hf_prune.methods.experts.diep import diep_scores
from hf_prune.methods.experts.expert_pruning import ExpertPruningConfig
from hf_prune.recipe import CalibrationConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _batch(seed: int = 0, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 11 tokens, the second with 7 real ones, padded (pad id 3) on the right or left."""
    ids = torch.randint(4, 300, (2, 11), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    pads = slice(0, 4) if left else slice(7, None)
    mask[1, pads] = 0
    ids[1, pads] = 3
    return ids, mask


def _moe_mlps(model) -> list[tuple[int, torch.nn.Module]]:
    return [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def _nonuniform(family: str, tokenizer, counts: list[int], stock=None):
    """An ``hf_prune_<family>`` model with ``counts`` experts per layer (random weights, or ``stock``'s)."""
    base = stock.config if stock is not None else build_tiny_model(family, tokenizer).config
    config_class, model_class = nonuniform_moe.CLASSES[family]
    fields = {k: v for k, v in base.to_dict().items() if k not in ("model_type", "architectures")}
    model = model_class(config_class(**fields, experts_per_layer=counts))
    if stock is not None:
        model.load_state_dict(stock.state_dict(), strict=True)
    else:
        randomize_(model, seed=7)
    return model.eval()


# ---- load-balancing loss -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MOE_TYPES)
def test_aux_loss_with_equal_counts_is_the_stock_aux_loss(family, tokenizer):
    """Planted: averaging per-layer losses (stock averages fractions over all layers' tokens first), summing
    them, dropping the attention mask, the wrong top-k. Reference: the stock class, same weights."""
    stock = build_tiny_model(family, tokenizer).eval()
    counts = [
        int(mlp.experts.num_experts) if hasattr(mlp, "experts") else 0
        for mlp in (layer.mlp for layer in stock.model.layers)
    ]
    model = _nonuniform(family, tokenizer, counts, stock=stock)
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        for attention_mask in (mask, None):
            want = stock(
                input_ids=ids, attention_mask=attention_mask, labels=labels, output_router_logits=True
            )
            got = model(
                input_ids=ids, attention_mask=attention_mask, labels=labels, output_router_logits=True
            )
            torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-6, atol=0)
            torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=0)
            assert len(got.router_logits) == len(want.router_logits)
            for a, b in zip(got.router_logits, want.router_logits, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        # The attention mask given positionally (forward(input_ids, attention_mask, ...)) counts too.
        want = stock(ids, mask, output_router_logits=True).aux_loss
        torch.testing.assert_close(
            model(ids, mask, output_router_logits=True).aux_loss, want, rtol=1e-6, atol=0
        )
        # The config's flag turns the loss on as the keyword does.
        model.config.output_router_logits = stock.config.output_router_logits = True
        torch.testing.assert_close(model(ids, mask).aux_loss, want, rtol=1e-6, atol=0)
        # ...and the keyword overrides the flag.
        assert model(ids, mask, output_router_logits=False).aux_loss is None


def _aux_by_hand(model, ids, mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Switch-Transformer balance loss over all MoE layers: W·Σ_e f_e·P_e, with f_e the share of (token,
    layer) pairs routing to expert e among their top-k and P_e its mean probability over the same pairs
    (pad tokens left out), W the widest layer's count; a layer with fewer experts never routes to, and
    gives no probability to, the experts it lacks. Router logits recomputed from each router's input."""
    inputs = []
    hooks = [
        mlp.gate.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
        for _, mlp in _moe_mlps(model)
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask)
    finally:
        for hook in hooks:
            hook.remove()
    routers = [mlp.gate.weight for _, mlp in _moe_mlps(model)]
    width = max(w.shape[0] for w in routers)
    top_k = model.config.num_experts_per_tok
    keep = torch.ones(ids.numel()) if mask is None else mask.reshape(-1).float()
    counts, probs, rows, all_logits = torch.zeros(width), torch.zeros(width), 0.0, []
    for x, weight in zip(inputs, routers, strict=True):
        logits = x.reshape(-1, x.shape[-1]) @ weight.T
        all_logits.append(logits)
        p = torch.softmax(logits.double(), dim=-1)
        for t in range(p.shape[0]):
            for e in torch.topk(p[t], top_k).indices.tolist():
                counts[e] += keep[t]
            probs[: p.shape[1]] += keep[t] * p[t].float()
        rows += float(keep.sum())
    return width * ((counts / rows) * (probs / rows)).sum(), all_logits


@pytest.mark.parametrize(("family", "counts"), [("mixtral", [2, 3, 4, 2]), ("qwen2_moe", [0, 3, 0, 2])])
def test_aux_loss_with_different_counts_by_hand(family, counts, tokenizer):
    """Planted: per-layer losses averaged (or summed: 2-4x too large), pads counted, missing experts
    padded with 0 instead of -inf, the count of one layer instead of the widest. Reference: by hand."""
    model = _nonuniform(family, tokenizer, counts)
    ids, mask = _batch(1)
    labels = ids.masked_fill(mask == 0, -100)
    for attention_mask in (mask, None):
        want, logits = _aux_by_hand(model, ids, attention_mask)
        with torch.no_grad():
            out = model(
                input_ids=ids, attention_mask=attention_mask, labels=labels, output_router_logits=True
            )
            plain = model(input_ids=ids, attention_mask=attention_mask, labels=labels)
        assert [r.shape[-1] for r in out.router_logits] == [n for n in counts if n]
        for got, expected in zip(out.router_logits, logits, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.aux_loss, want, rtol=1e-5, atol=0)
        assert plain.aux_loss is None and plain.router_logits is None
        torch.testing.assert_close(
            out.loss, plain.loss + model.config.router_aux_loss_coef * want, rtol=1e-5, atol=0
        )
    with torch.no_grad():
        want, _ = _aux_by_hand(model, ids, None)
        # Only input_ids given positionally: no mask.
        torch.testing.assert_close(model(ids, output_router_logits=True).aux_loss, want, rtol=1e-5, atol=0)
        # The config's flag turns the loss on as the keyword does; the keyword overrides it.
        model.config.output_router_logits = True
        torch.testing.assert_close(model(ids).aux_loss, want, rtol=1e-5, atol=0)
        assert model(ids, output_router_logits=False).aux_loss is None


# ---- DiEP ------------------------------------------------------------------------------------------------


def _capture_moe_io(model, ids, mask) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Input and output of every MoE block on the non-pad tokens, from the unmodified model."""
    keep = mask.reshape(-1).bool()
    xs, zs = {}, {}

    def make(index):
        def hook(_module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            xs[index] = args[0].reshape(-1, args[0].shape[-1])[keep].detach().clone()
            zs[index] = out.reshape(-1, out.shape[-1])[keep].detach().clone()

        return hook

    hooks = [mlp.register_forward_hook(make(i)) for i, mlp in _moe_mlps(model)]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return xs, zs


def _diep_objective(model, ids, mask, xs, zs, alphas, betas, *, weighting, lam, lm_weight):
    """lm_weight·CE(model whose MoE layers compute β_l·Σ_{e∈topk} α_{l,e}[·w_e]·E_e) + λ·Σ_l mean ‖Z_l − ·‖₂;
    returns (total, reconstruction sum, CE)."""

    def make(index):
        def hook(_module, _args, output):
            logits, weights, indices = output
            new = betas[index] * alphas[index][indices]
            if weighting == "router":
                new = new * weights
            return logits, new.to(weights.dtype), indices

        return hook

    hooks = [mlp.gate.register_forward_hook(make(i)) for i, mlp in _moe_mlps(model)]
    try:
        recon = 0
        for i, mlp in _moe_mlps(model):
            out = mlp(xs[i][None])
            out = (out[0] if isinstance(out, tuple) else out).reshape(xs[i].shape)
            recon = recon + torch.linalg.vector_norm(zs[i] - out, dim=-1).mean()
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        ce = -logp[mask[:, 1:].bool()].mean()
    finally:
        for hook in hooks:
            hook.remove()
    return lm_weight * ce + lam * recon, recon, ce


def _context(model, tokenizer, tmp_path, ids, mask):
    data = write_calibration_file(tmp_path / "unused.txt", num_chars=500)
    context = PruneContext(
        get_adapter(model.config), tokenizer, CalibrationConfig(data=str(data)), progress=False
    )
    context._batches = [CalibrationBatch(ids, mask)]
    return context


def _reference_steps(model, ids, mask, alpha0, beta0, *, weighting, lam, lm_weight, lr_alpha, lr_beta):
    """One SGD step on α from (1, β0), then one on β from (α1, β0), by a separate autograd computation."""
    xs, zs = _capture_moe_io(model, ids, mask)
    for p in model.parameters():
        p.requires_grad_(False)
    alphas = {i: alpha0[i].clone().requires_grad_(True) for i in alpha0}
    betas = {i: torch.tensor(beta0[i]) for i in beta0}
    kw = dict(weighting=weighting, lam=lam, lm_weight=lm_weight)
    loss, recon0, ce0 = _diep_objective(model, ids, mask, xs, zs, alphas, betas, **kw)
    grads = dict(zip(alphas, torch.autograd.grad(loss, list(alphas.values())), strict=True))
    alpha1 = {i: (alphas[i] - lr_alpha * grads[i]).detach() for i in alphas}
    betas = {i: betas[i].clone().requires_grad_(True) for i in betas}
    loss, recon1, ce1 = _diep_objective(model, ids, mask, xs, zs, alpha1, betas, **kw)
    beta_grads = dict(zip(betas, torch.autograd.grad(loss, list(betas.values())), strict=True))
    beta1 = {i: (betas[i] - lr_beta * beta_grads[i]).detach() for i in betas}
    for p in model.parameters():
        p.requires_grad_(True)
    history = [(float(recon0.detach()), float(ce0.detach())), (float(recon1.detach()), float(ce1.detach()))]
    return grads, alpha1, beta1, history


@pytest.mark.parametrize(("family", "weighting"), [("mixtral", "replace"), ("qwen2_moe", "router")])
def test_diep_first_steps_are_sgd_on_the_objective(family, weighting, tokenizer, tmp_path):
    """Planted: the language-model term's gradient zeroed, λ dropped from the reconstruction term, β left
    out of the candidate, the α/β phases swapped, pads in the LM loss. Reference: own autograd of METHODS.md's
    objective (SGD, one calibration batch: epoch 1 = one α step, epoch 2 = one β step)."""
    model = build_tiny_model(family, tokenizer).eval()
    ids, mask = _batch(2, left=True)  # left padding: the attention mask matters for the LM loss
    moe = [i for i, _ in _moe_mlps(model)]
    beta0 = {i: (2.0 if p < len(moe) / 2 else 0.2) for p, i in enumerate(moe)}  # the official schedule
    alpha0 = {i: torch.ones(4) for i in moe}
    lr_alpha, lr_beta = 0.5, 0.5
    kw = dict(weighting=weighting, lam=0.12, lm_weight=1.0, lr_alpha=lr_alpha, lr_beta=lr_beta)
    grads, alpha1, beta1, history = _reference_steps(model, ids, mask, alpha0, beta0, **kw)
    # The test has power: without the LM term (or the reconstruction term) the step is clearly different.
    no_lm = _reference_steps(model, ids, mask, alpha0, beta0, **{**kw, "lm_weight": 0.0})
    no_recon = _reference_steps(model, ids, mask, alpha0, beta0, **{**kw, "lam": 0.0})
    for other in (no_lm, no_recon):
        assert max(float((other[1][i] - alpha1[i]).abs().max()) for i in moe) > 1e-3
        assert max(abs(float(other[2][i] - beta1[i])) for i in moe) > 1e-3
    for i in moe:  # the clamp does not act here
        assert 1e-5 < float(alpha1[i].min()) and float(alpha1[i].max()) < 5 and 1e-5 < float(beta1[i]) < 5

    config = ExpertPruningConfig(
        keep_ratio=0.5,
        epochs=2,
        alpha_epochs=1,
        beta_epochs=1,
        lr_alpha=lr_alpha,
        lr_beta=lr_beta,
        alpha_weighting=weighting,
        max_cached_tokens=1000,
    )
    scores, details = diep_scores(model, _context(model, tokenizer, tmp_path, ids, mask), config)
    assert sorted(scores) == moe
    for i in moe:
        torch.testing.assert_close(details["alpha"][i], alpha1[i], rtol=0, atol=2e-6)
        torch.testing.assert_close(details["beta"][i], beta1[i], rtol=0, atol=2e-6)
        torch.testing.assert_close(scores[i], alpha1[i].abs() * beta1[i], rtol=0, atol=5e-6)
    assert details["cached_tokens"] == details["calibration_tokens"] == int(mask.sum())
    assert [(h["epoch"], h["phase"]) for h in details["history"]] == [(0, "alpha"), (1, "beta")]
    for h, (recon, ce) in zip(details["history"], history, strict=True):
        assert h["reconstruction"] == pytest.approx(recon, rel=1e-5)
        assert h["lm_loss"] == pytest.approx(ce, rel=1e-5)


def test_diep_scores_are_abs_alpha_times_beta(tokenizer, tmp_path):
    """Planted: scores = α·β (sign kept), α alone, the clamp bounds swapped. Reference: own autograd step,
    with a learning rate chosen so that the expert of largest gradient overshoots to α = -0.5 (the lower
    clamp set below 0 for this), and the ranking of |α|·β done by hand."""
    model = build_tiny_model("mixtral", tokenizer).eval()
    ids, mask = _batch(3)
    moe = [i for i, _ in _moe_mlps(model)]
    beta0 = {i: 1.0 for i in moe}
    alpha0 = {i: torch.ones(4) for i in moe}
    kw = dict(weighting="replace", lam=0.12, lm_weight=1.0, lr_beta=1e-9)
    grads, _, _, _ = _reference_steps(model, ids, mask, alpha0, beta0, **kw, lr_alpha=1.0)
    layer, expert = max(((i, int(grads[i].argmax())) for i in moe), key=lambda p: float(grads[p[0]][p[1]]))
    lr = 1.5 / float(grads[layer][expert])
    _, alpha1, beta1, _ = _reference_steps(model, ids, mask, alpha0, beta0, **kw, lr_alpha=lr)
    assert float(alpha1[layer][expert]) == pytest.approx(-0.5, abs=1e-5)

    config = ExpertPruningConfig(
        keep_ratio=0.5,
        epochs=2,
        alpha_epochs=1,
        beta_epochs=1,
        lr_alpha=lr,
        lr_beta=1e-9,
        beta_init=1.0,
        max_cached_tokens=1000,
    )
    config.clamp_min = -5.0  # past validation: let α go negative to see |α|
    scores, details = diep_scores(model, _context(model, tokenizer, tmp_path, ids, mask), config)
    expected = {i: alpha1[i].abs() * beta1[i] for i in moe}
    for i in moe:
        torch.testing.assert_close(details["alpha"][i], alpha1[i], rtol=0, atol=1e-5)
        torch.testing.assert_close(scores[i], expected[i], rtol=0, atol=1e-5)
    # The overshooting expert ranks by its magnitude 0.5, not by -0.5.
    ranking = sorted(((float(expected[i][e]), i, e) for i in moe for e in range(4)), reverse=True)
    got = sorted(((float(scores[i][e]), i, e) for i in moe for e in range(4)), reverse=True)
    assert [(i, e) for _, i, e in got] == [(i, e) for _, i, e in ranking]
    assert float(scores[layer][expert]) == pytest.approx(0.5, abs=1e-4)


def test_diep_epoch_means_over_batches_and_cached_chunks(tokenizer, tmp_path):
    """Two calibration batches: each SGD step fits the LM loss on its batch and the reconstruction on its half
    of the cached tokens; the history holds the epoch's mean of both. With lr ≈ 0, α and β stay where
    they start, so the reference is the objective at (1, β0) on each part. Planted: sums instead of means,
    every step on all cached tokens, reconstruction reported when λ = 0. Reference: own computation."""
    model = build_tiny_model("mixtral", tokenizer).eval()
    (ids0, mask0), (ids1, mask1) = _batch(4), _batch(5)
    mask1[0, 10:], ids1[0, 10:] = 0, 3  # 18 + 17 real tokens: the two halves differ in size
    moe = [i for i, _ in _moe_mlps(model)]
    beta0 = {i: (2.0 if p < len(moe) / 2 else 0.2) for p, i in enumerate(moe)}
    ones = {i: torch.ones(4) for i in moe}
    x0, z0 = _capture_moe_io(model, ids0, mask0)
    x1, z1 = _capture_moe_io(model, ids1, mask1)
    xs = {i: torch.cat([x0[i], x1[i]]) for i in moe}
    zs = {i: torch.cat([z0[i], z1[i]]) for i in moe}
    n = xs[moe[0]].shape[0]
    halves = [slice(0, (n + 1) // 2), slice((n + 1) // 2, n)]  # torch.tensor_split's first part is the larger
    expected_recon, expected_ce = [], []
    with torch.no_grad():
        for (ids, mask), rows in zip([(ids0, mask0), (ids1, mask1)], halves, strict=True):
            part_x = {i: xs[i][rows] for i in moe}
            part_z = {i: zs[i][rows] for i in moe}
            _, recon, ce = _diep_objective(
                model, ids, mask, part_x, part_z, ones, beta0, weighting="replace", lam=0.12, lm_weight=1.0
            )
            expected_recon.append(float(recon))
            expected_ce.append(float(ce))
    context = _context(model, tokenizer, tmp_path, ids0, mask0)
    context._batches = [CalibrationBatch(ids0, mask0), CalibrationBatch(ids1, mask1)]
    config = ExpertPruningConfig(keep_ratio=0.5, epochs=1, lr_alpha=1e-12, max_cached_tokens=1000)
    _, details = diep_scores(model, context, config)
    (entry,) = details["history"]
    assert entry["reconstruction"] == pytest.approx(sum(expected_recon) / 2, rel=1e-5)
    assert entry["lm_loss"] == pytest.approx(sum(expected_ce) / 2, rel=1e-5)
    assert details["cached_tokens"] == n == int(mask0.sum() + mask1.sum())
    seconds = details["seconds"]
    assert 0 < seconds["cache"] <= seconds["total"] < 600
    assert 0 < seconds["lm_loss"] + sum(seconds["per_layer"].values()) <= seconds["total"]
    assert all(v > 0 for v in seconds["per_layer"].values())
    # λ = 0: no reconstruction is computed or reported.
    config = ExpertPruningConfig(keep_ratio=0.5, epochs=1, lr_alpha=1e-12, lambda_recon=0.0)
    _, details = diep_scores(model, context, config)
    assert details["history"][0]["reconstruction"] == 0.0
    assert details["history"][0]["lm_loss"] == pytest.approx(sum(expected_ce) / 2, rel=1e-5)
    assert details["seconds"]["per_layer"] == dict.fromkeys(moe, 0.0)
