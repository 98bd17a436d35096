"""GMP, GraNet and lottery tickets run for real inside ``transformers.Trainer`` on a tiny Llama: what the
weights hold after every optimizer step (read by a probe callback, counted here), resume against the
uninterrupted run (bitwise), gradient accumulation, the saved checkpoint's zeros, and the rewinding."""

from __future__ import annotations

import pytest
import torch
from hf_prune.integrations import PruningCallback, run_lottery
from safetensors.torch import load_file
from tiny_models import NUM_LAYERS, build_tiny_model, build_tokenizer
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import hf_prune
from hf_prune.errors import HfPruneError, RecipeError

MAX_STEPS = 12
MLP = ("*mlp*",)  # the MLP projections of every layer


class TokenWindows(torch.utils.data.Dataset):
    def __init__(self, vocab: int, count: int = 48, length: int = 12):
        self.ids = torch.randint(4, vocab, (count, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


class Probe(TrainerCallback):
    """Copies the targeted weights (and the optimizer's state) after every optimizer step."""

    def __init__(self, suffix: str = "mlp", method=None):
        self.suffix, self.weights, self.moments, self.first = suffix, {}, {}, None
        self.method, self.masks = method, {}  # the method's own masks too, when given

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.first is None:  # the weights the first forward sees (after begin)
            self.first = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        params = {
            n: p for n, p in model.named_parameters() if f".{self.suffix}." in n and n.endswith("weight")
        }
        self.weights[state.global_step] = {n: p.detach().clone() for n, p in params.items()}
        if self.method is not None:
            self.masks[state.global_step] = {n: m.clone() for n, m in self.method.masks.items()}
        inner = getattr(optimizer, "optimizer", optimizer)
        self.moments[state.global_step] = {
            n: [v.clone() for v in inner.state[p].values() if torch.is_tensor(v) and v.shape == p.shape]
            for n, p in params.items()
        }


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def train(tokenizer, out, config, *, optim="adamw_torch", steps=MAX_STEPS, model=None, resume=None, **kw):
    torch.manual_seed(0)
    model = model if model is not None else build_tiny_model("llama", tokenizer).train()
    callback = PruningCallback(dict(config))
    probe = Probe(method=callback.method)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=3e-2,  # large, so that weights the masks let go would visibly regrow
        optim=optim,
        lr_scheduler_type="constant",
        save_strategy="steps" if kw.get("save_steps") else "no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        data_seed=0,
        resume_from_checkpoint=resume,  # the callback reads the folder from here (Trainer does not say)
        **kw,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=TokenWindows(len(tokenizer)), callbacks=[callback, probe]
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, callback, probe


def lottery_trainer(model, tokenizer, folder, steps, callbacks) -> Trainer:
    args = TrainingArguments(
        output_dir=str(folder),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        seed=0,
    )
    return Trainer(model=model, args=args, train_dataset=TokenWindows(len(tokenizer)), callbacks=callbacks)


def zero_count(weights: dict[str, torch.Tensor]) -> tuple[int, int]:
    return sum(int((w == 0).sum()) for w in weights.values()), sum(w.numel() for w in weights.values())


def cubic(t, s_i, s_f, t0, t_f):
    return s_f + (s_i - s_f) * (1 - (t - t0) / (t_f - t0)) ** 3


GMP = {
    "method": "gmp",
    "initial_sparsity": 0.1,
    "final_sparsity": 0.7,
    "start_step": 2,
    "end_step": 9,
    "frequency": 3,
    "targets": list(MLP),
}


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_gmp_sparsity_follows_the_cubic_formula_at_every_step(tokenizer, tmp_path, scope):
    _, callback, probe = train(tokenizer, tmp_path, GMP | {"scope": scope})
    pruning_steps = [2, 5, 8, 9]  # every 3rd from 2, and end_step 9
    for step in range(1, MAX_STEPS + 1):
        held = max((t for t in pruning_steps if t <= step), default=None)
        expected = 0.0 if held is None else cubic(held, 0.1, 0.7, 2, 9)
        weights = probe.weights[step]
        if scope == "global":
            zeros, total = zero_count(weights)
            assert zeros == round(expected * total), step
        else:
            for name, w in weights.items():
                assert int((w == 0).sum()) == round(expected * w.numel()), (step, name)
    assert [h["step"] for h in callback.report.details["history"]] == pruning_steps
    zeros, total = zero_count(probe.weights[MAX_STEPS])
    assert callback.report.details["sparsity"] == pytest.approx(zeros / total, abs=1e-6)
    assert callback.report.details["pruned_weights"] == zeros


@pytest.mark.parametrize("optim", ["sgd", "adamw_torch"])
def test_pruned_weights_and_their_moments_stay_zero(tokenizer, tmp_path, optim):
    config = GMP | {"frequency": 1}
    _, _, probe = train(
        tokenizer, tmp_path, config, optim=optim, optim_args="momentum=0.9" if optim == "sgd" else None
    )
    for step in range(3, MAX_STEPS + 1):
        for name, before in probe.weights[step - 1].items():
            after = probe.weights[step][name]
            assert torch.all(after[before == 0] == 0), (step, name)  # nothing pruned comes back
            for moment in probe.moments[step][name]:  # SGD momentum, Adam's exp_avg and exp_avg_sq
                assert torch.all(moment[after == 0] == 0), (step, name)
        assert any(
            torch.any(probe.weights[step][n] != probe.weights[step - 1][n]) for n in probe.weights[step]
        )


def test_gradient_accumulation_counts_optimizer_steps(tokenizer, tmp_path):
    _, callback, probe = train(tokenizer, tmp_path, GMP, steps=10, gradient_accumulation_steps=3)
    assert [h["step"] for h in callback.report.details["history"]] == [2, 5, 8, 9]
    assert sorted(probe.weights) == list(range(1, 11))
    zeros, total = zero_count(probe.weights[4])
    assert zeros == round(cubic(2, 0.1, 0.7, 2, 9) * total)


def test_n_m_holds_n_of_every_m_and_follows_the_schedule(tokenizer, tmp_path):
    config = {
        "method": "gmp",
        "pattern": "2:4",
        "scope": "layer",
        "start_step": 0,
        "end_step": 6,
        "frequency": 2,
        "targets": list(MLP),
    }
    _, _, probe = train(tokenizer, tmp_path, config, steps=8)
    for step in (3, 5):
        for name, w in probe.weights[step].items():  # a share of the groups is 2:4, following the cubic
            assert int((w == 0).sum()) == 2 * round(cubic(step - 1, 0, 0.5, 0, 6) / 0.5 * w.numel() // 4), (
                name
            )
    for name, w in probe.weights[8].items():
        groups = (w != 0).reshape(-1, 4).sum(dim=1)
        assert torch.all(groups == 2), name


GRANET = {
    "method": "granet",
    "final_sparsity": 0.8,
    "start_step": 1,
    "end_step": 5,
    "frequency": 2,
    "scope": "layer",
    "targets": list(MLP),
}


def test_granet_regrows_as_many_as_it_prunes_and_keeps_the_density(tokenizer, tmp_path):
    _, callback, probe = train(tokenizer, tmp_path, GRANET)
    details = callback.report.details
    events = {h["step"]: h for h in details["history"]}
    assert sorted(events) == [1, 3, 5, 7, 9, 11]  # pruning steps, then every 2 steps after end_step
    live = round(0.2 * 64 * 32)  # per weight: scope layer, final sparsity 0.8
    for step in range(6, MAX_STEPS + 1):  # after end_step: regrowth only, at the final density
        regrown_here = 0
        for name, mask in probe.masks[step].items():
            before, w = probe.masks[step - 1][name], probe.weights[step][name]
            assert int(mask.sum()) == live, (step, name)
            dropped, revived = int((before & ~mask).sum()), int((~before & mask).sum())
            assert dropped == revived, (step, name)  # as many regrown as pruned
            assert torch.all(w[~mask] == 0), (step, name)
            assert torch.all(w[~before & mask] == 0), (step, name)  # regrown weights start at zero
            regrown_here += revived
        if step in events:
            r_t = 0.005 + 0.5 * (0.5 - 0.005) * (
                1 + torch.cos(torch.tensor(torch.pi * step / MAX_STEPS)).item()
            )
            assert events[step]["regrown"] == 3 * NUM_LAYERS * round(r_t * live)
            assert 0 < regrown_here <= events[step]["regrown"]  # a dropped weight may be regrown at once
        else:
            assert regrown_here == 0
    assert details["ever_active_fraction"] > 1 - 0.8  # regrowth lets more weights live than end up alive


def test_resume_equals_the_uninterrupted_run_bitwise(tokenizer, tmp_path):
    """Resumed from checkpoint-4 (mid-schedule) or checkpoint-8 (GraNet: regrowing after end_step), the
    run ends with the same weights and masks as the uninterrupted one."""
    for config in (GMP, GRANET):
        name = config["method"]
        whole, whole_callback, _ = train(tokenizer, tmp_path / f"{name}-whole", config, save_steps=4)
        for step in (4, 8):
            resumed, callback, _ = train(
                tokenizer,
                tmp_path / f"{name}-from-{step}",
                config,
                save_steps=4,
                resume=str(tmp_path / f"{name}-whole" / f"checkpoint-{step}"),
            )
            for (key, a), (_, b) in zip(
                whole.state_dict().items(), resumed.state_dict().items(), strict=True
            ):
                assert torch.equal(a, b), (name, step, key)
            assert callback.method.masks.keys() == whole_callback.method.masks.keys()
            for key, mask in whole_callback.method.masks.items():
                assert torch.equal(callback.method.masks[key], mask), (name, step, key)
            # the history before the checkpoint came back from its state
            assert callback.report.details["history"] == whole_callback.report.details["history"]


def test_resuming_from_elsewhere_without_saying_where_is_refused(tokenizer, tmp_path):
    train(tokenizer, tmp_path / "whole", GMP, save_steps=4)
    model = build_tiny_model("llama", tokenizer).train()
    args = TrainingArguments(
        output_dir=str(tmp_path / "other"),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenWindows(len(tokenizer)),
        callbacks=[PruningCallback(dict(GMP))],
    )
    with pytest.raises(HfPruneError, match="set TrainingArguments\\(resume_from_checkpoint=FOLDER\\)"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_the_schedule_and_the_zeros(tokenizer, tmp_path, precision):
    """Trainer's bf16=True / fp16=True (autocast on the CPU; no loss scaler there, so no skipped steps):
    the masks and the cubic schedule hold as in float32."""
    _, callback, probe = train(tokenizer, tmp_path, GMP | {"frequency": 1}, **{precision: True})
    for step in range(2, MAX_STEPS + 1):
        held = min(step, 9)
        zeros, total = zero_count(probe.weights[step])
        assert zeros == round(cubic(held, 0.1, 0.7, 2, 9) * total), step
    assert callback.report.details["sparsity"] == pytest.approx(0.7, abs=1e-5)


def test_saved_model_has_every_masked_weight_zero_and_reloads(tokenizer, tmp_path):
    model, callback, _ = train(tokenizer, tmp_path / "run", GMP)
    model.save_pretrained(tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    for name, mask in callback.method.masks.items():
        assert torch.all(saved[name][~mask] == 0), name
        assert int((saved[name] == 0).sum()) >= int((~mask).sum())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[5, 9, 11, 20, 7]])
    assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)


def test_granet_neurons_die_whole_and_end_changes_no_output(tokenizer, tmp_path):
    config = GRANET | {"pattern": "neurons", "final_sparsity": 0.5, "targets": ["*"]}
    model, callback, probe = train(tokenizer, tmp_path, config, steps=8)
    ids = torch.tensor([[5, 9, 11, 20, 7]])
    for step in (6, 7):  # after end_step: half of each MLP's 64 neurons silenced by their gate row
        for layer in range(NUM_LAYERS):
            mask = probe.masks[step][f"model.layers.{layer}.mlp.gate_proj.weight"]
            assert int(mask.all(dim=1).sum()) == 32 and int((~mask).all(dim=1).sum()) == 32
            gate = probe.weights[step][f"model.layers.{layer}.mlp.gate_proj.weight"]
            assert torch.all(gate[~mask] == 0)
    # end() zeroed the rest of every dead neuron: rows of up_proj and columns of down_proj.
    for layer in range(NUM_LAYERS):
        mlp = model.model.layers[layer].mlp
        dead = mlp.gate_proj.weight.abs().sum(dim=1) == 0
        assert int(dead.sum()) == 32
        assert torch.all(mlp.up_proj.weight[dead] == 0) and torch.all(mlp.down_proj.weight[:, dead] == 0)
        assert torch.all(mlp.up_proj.weight[~dead].abs().sum(dim=1) > 0)
    # The silencing already made dead neurons output zero: restoring their other weights changes nothing.
    last = probe.weights[8]
    with torch.no_grad():
        reference = model.eval()(ids).logits
        for layer in range(NUM_LAYERS):
            mlp = model.model.layers[layer].mlp
            mlp.up_proj.weight.copy_(last[f"model.layers.{layer}.mlp.up_proj.weight"])
            mlp.down_proj.weight.copy_(last[f"model.layers.{layer}.mlp.down_proj.weight"])
        torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=1e-6)
    assert callback.report.details["sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_gmp_neurons_by_l1_per_layer(tokenizer, tmp_path):
    config = {
        "method": "gmp",
        "pattern": "neurons",
        "scope": "layer",
        "final_sparsity": 0.25,
        "initial_sparsity": 0.25,
        "start_step": 0,
        "end_step": 4,
        "frequency": 10,
    }
    torch.manual_seed(0)
    model = build_tiny_model("llama", tokenizer).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, _, probe = train(tokenizer, tmp_path, config, model=model, steps=4)
    for layer in range(NUM_LAYERS):
        prefix = f"model.layers.{layer}.mlp."
        l1 = (
            before[prefix + "gate_proj.weight"].abs().sum(1)
            + before[prefix + "up_proj.weight"].abs().sum(1)
            + before[prefix + "down_proj.weight"].abs().sum(0)
        ).tolist()
        weakest = sorted(range(64), key=lambda j: l1[j])[:16]  # round(0.25 * 64) at step 0, before training
        dead = (probe.first[prefix + "down_proj.weight"] == 0).all(dim=0)
        assert sorted(torch.nonzero(dead).flatten().tolist()) == sorted(weakest)


def test_a_target_matching_nothing_fails_when_the_trainer_is_built(tokenizer, tmp_path):
    with pytest.raises(RecipeError, match=r"targets: '\*attention\*' matches no Linear"):
        train(tokenizer, tmp_path, GMP | {"targets": ["*attention*"]})
    with pytest.raises(RecipeError, match="end_step: 9 is after the run's last optimizer step"):
        train(tokenizer, tmp_path, GMP, steps=5)


def test_lottery_rewinds_to_the_stored_weights(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_tiny_model("llama", tokenizer).train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    probes, ends = [], []

    class AtEnd(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            ends.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def make_trainer(round_index):
        probes.append(Probe())
        return lottery_trainer(model, tokenizer, tmp_path / f"round-{round_index}", 3, [probes[-1], AtEnd()])

    method, reports = run_lottery(make_trainer, {"rounds": 2, "rewind": "weights", "targets": list(MLP)})
    assert len(reports) == 3 and method.round == 2
    for r in (1, 2):
        first = probes[r].first
        for name in probes[r].weights[1]:
            kept = first[name] != 0
            # back to the initialisation
            assert torch.equal(first[name][kept], initial[name][kept]), (r, name)
        zeros, total = zero_count({n: first[n] for n in probes[r].weights[1]})
        assert zeros == round((1 - 0.8**r) * total)
        # The mask is the smallest |w| of the trained weights at the end of the previous run, over all layers.
        trained = {n: ends[r - 1][n] for n in probes[r].weights[1]}
        order = sorted((abs(v), n, i) for n, t in trained.items() for i, v in enumerate(t.flatten().tolist()))
        pruned = {(n, i) for _, n, i in order[:zeros]}
        for name, t in first.items():
            if name in trained:
                assert [(name, i) in pruned for i in range(t.numel())] == (t.flatten() == 0).tolist()


def test_lottery_lrr_keeps_the_trained_weights(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_tiny_model("llama", tokenizer).train()
    probes = []

    def make_trainer(round_index):
        probes.append(Probe())
        return lottery_trainer(model, tokenizer, tmp_path / f"r{round_index}", 2, [probes[-1]])

    run_lottery(make_trainer, {"rounds": 1, "targets": list(MLP)})
    for name, trained in probes[0].weights[2].items():
        first = probes[1].first[name]
        assert torch.equal(first[first != 0], trained[first != 0])


def test_pruning_callback_is_importable_from_the_top_level():
    assert hf_prune.PruningCallback is PruningCallback


def test_lottery_resumes_from_a_checkpoint_of_a_later_round(tokenizer, tmp_path):
    """A lottery run resumed from checkpoint-2 of round 1 ends with the weights and masks of the
    uninterrupted run (the round, masks and rewind point come back from the checkpoint)."""

    def run(folder, resume=None):
        torch.manual_seed(0)
        model = build_tiny_model("llama", tokenizer).train()

        def make_trainer(round_index):
            trainer = lottery_trainer(model, tokenizer, folder / f"round-{round_index}", 4, [])
            trainer.args.save_strategy, trainer.args.save_steps = "steps", 2
            return trainer

        config = {"rounds": 2, "rewind": "weights", "targets": list(MLP)}
        method, reports = run_lottery(make_trainer, config, resume_from_checkpoint=resume)
        return model, method, reports

    whole, whole_method, _ = run(tmp_path / "whole")
    resumed, method, reports = run(tmp_path / "again", resume=tmp_path / "whole" / "round-1" / "checkpoint-2")
    assert len(reports) == 2  # the rest of round 1, then round 2
    assert method.round == whole_method.round == 2
    for (key, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    for key, mask in whole_method.masks.items():
        assert torch.equal(method.masks[key], mask), key
