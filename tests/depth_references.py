"""Tiny models, calibration batches and stock-model activation capture for the depth-pruning reference
tests (tests/methods/test_replaceme_*.py, test_depth_*.py): nothing here calls ``hf_prune.methods.depth``
to build an expected value."""

from __future__ import annotations

import torch
import transformers as tf

from hf_prune.adapters import get_adapter
from hf_prune.calibration import CalibrationBatch
from hf_prune.context import PruneContext

HIDDEN = 16


VOCAB = 64


PAD = 0


def tiny_llama(num_layers=6, *, mlp_bias=False, damped=(), seed=0):
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        mlp_bias=mlp_bias,
        tie_word_embeddings=False,
        pad_token_id=PAD,
    )
    return _randomised(tf.LlamaForCausalLM(config), seed, damped)


def tiny_qwen2(num_layers=6, *, damped=(), seed=0):
    types = ["full_attention", "sliding_attention", "sliding_attention"] * (num_layers // 3)
    config = tf.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=num_layers,
        layer_types=types,
        tie_word_embeddings=False,
        pad_token_id=PAD,
    )
    return _randomised(tf.Qwen2ForCausalLM(config), seed, damped)


@torch.no_grad()
def _randomised(model, seed, damped):
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * 0.2
        is_norm = param.dim() == 1 and "norm" in name
        param.copy_(1.0 + 0.1 * noise if is_norm else noise)
    for index in damped:  # a nearly-identity layer: angular distance picks it
        layer = model.model.layers[index]
        layer.self_attn.o_proj.weight.mul_(0.01)
        layer.mlp.down_proj.weight.mul_(0.01)
        if layer.mlp.down_proj.bias is not None:
            layer.mlp.down_proj.bias.mul_(0.01)
    return model.float().eval()


def batches(lengths=((24, 24, 17, 9), (24, 12, 24, 20)), seed=1):
    """Right-padded batches; the pad positions hold random tokens (not the pad id) so that a statistic that
    reads them changes."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for row_lengths in lengths:
        width = max(row_lengths)
        ids = torch.randint(1, VOCAB, (len(row_lengths), width), generator=generator)
        mask = torch.zeros(len(row_lengths), width, dtype=torch.long)
        for row, n in enumerate(row_lengths):
            mask[row, :n] = 1
        out.append(CalibrationBatch(ids, mask))
    return out


def context_for(model, calibration):
    return PruneContext(adapter=get_adapter(model.config), progress=False, _batches=calibration)


@torch.no_grad()
def hooked_states(model, calibration, modules):
    """Outputs of ``modules`` (name → module) on the non-pad tokens of every batch, stock forward, float64;
    also, for each batch, the rows of the last real token."""
    store = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():

        def hook(mod, args, output, name=name):
            out = output[0] if isinstance(output, tuple) else output
            store[name].append(out.detach())

        handles.append(module.register_forward_hook(hook))
    masks = []
    try:
        for batch in calibration:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            masks.append(batch.attention_mask.bool())
    finally:
        for handle in handles:
            handle.remove()
    tokens = {
        name: torch.cat([o[m] for o, m in zip(outs, masks, strict=True)]).double()
        for name, outs in store.items()
    }
    last = {}
    for name, outs in store.items():
        rows = []
        for o, m in zip(outs, masks, strict=True):
            for r in range(m.shape[0]):
                rows.append(o[r, int(m[r].sum()) - 1])
        last[name] = torch.stack(rows).double()
    return tokens, last


def reference_map(model, calibration, kept, last_removed):
    """(T, M, Y, R) from the stock model: lstsq of R = h_{last} − (h_kept − M) on M over non-pad tokens."""
    layers = model.model.layers
    states, _ = hooked_states(
        model, calibration, {"h": layers[kept], "m": layers[kept].mlp, "target": layers[last_removed]}
    )
    m, h, target = states["m"], states["h"], states["target"]
    y = h - m
    r = target - y
    t = torch.linalg.lstsq(m, r, driver="gelsd").solution
    return t, m, y, r


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def count_calls(model):
    counts = {}
    handles = []
    modules = {f"layer{i}": layer for i, layer in enumerate(model.model.layers)}
    modules.update(norm=model.model.norm, lm_head=model.lm_head)
    for name, module in modules.items():
        counts[name] = 0

        def hook(mod, args, output, name=name):
            counts[name] += 1

        handles.append(module.register_forward_hook(hook))
    return counts, handles


def tiny_llava_config():
    text = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1,
        layer_types=["full_attention"] * 4,
    )  # fmt: skip
    vision = tf.CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    return tf.LlavaConfig(text_config=text, vision_config=vision)
