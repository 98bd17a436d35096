"""The training-time method contract, run for real: ``TrainingMethodCallback`` drives a small method defined
here (a magnitude mask on the MLP output projections, made sparser at step 2 and re-applied after every
optimizer step) through ``transformers.Trainer`` on a tiny Llama: hooks in order with their step numbers,
the mask holding after training, the state in ``checkpoint-N`` being the state at step N, and a Trainer
resumed from ``checkpoint-2`` restoring it and ending where the uninterrupted run ended."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pytest
import torch
from hf_prune.integrations.training_callback import STATE_FILE, TrainingMethodCallback
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import NUM_LAYERS, build_tiny_model, build_tokenizer
from transformers import Trainer, TrainingArguments

from hf_prune.errors import HfPruneError
from hf_prune.methods.base import OneShotMethod, StageReport, TrainingMethod, config_field

MAX_STEPS = 4
SAVE_STEPS = 2
UPDATE_STEP = 2  # the step at which the mask becomes sparser
TARGET = "mlp.down_proj.weight"


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for the weights kept: all but the round(sparsity·n) smallest |w| (ties by position)."""
    flat = weight.detach().abs().flatten()
    pruned = round(sparsity * flat.numel())
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask[torch.argsort(flat, stable=True)[:pruned]] = False
    return mask.view_as(weight)


@dataclass
class MagnitudeMask(TrainingMethod):
    """Test method: magnitude mask at ``initial_sparsity``, then ``final_sparsity`` from step 2."""

    initial_sparsity: float = config_field(0.25, help="share of each weight pruned at step 0")
    final_sparsity: float = config_field(0.5, help="share of each weight pruned from UPDATE_STEP on")

    def __post_init__(self) -> None:
        # Run state (not config fields): the masks, the schedule's position, and what the hooks saw.
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity, self.step = 0.0, 0
        self.calls: list[tuple] = []
        self.snapshots: dict[int, dict] = {}  # step -> the state after that step, kept by the method itself
        self.loaded: dict | None = None

    def targets(self, model) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if n.endswith(TARGET)}

    @torch.no_grad()
    def apply_masks(self, model) -> None:
        for name, weight in self.targets(model).items():
            weight.mul_(self.masks[name].to(weight.dtype))

    def begin(self, model, *, step, total_steps, optimizer=None):
        self.calls.append(("begin", step, total_steps, optimizer is not None))
        self.step = step
        if step == 0:
            self.sparsity = self.initial_sparsity
            self.masks = {n: magnitude_mask(w, self.sparsity) for n, w in self.targets(model).items()}
        assert self.masks, "resumed without the checkpoint's masks"
        self.apply_masks(model)

    def after_optimizer_step(self, model, step, optimizer):
        grads = all(w.grad is not None for w in self.targets(model).values())
        self.calls.append(("after_optimizer_step", step, grads))
        self.step = step
        if step == UPDATE_STEP:
            self.sparsity = self.final_sparsity
            self.masks = {n: magnitude_mask(w, self.sparsity) for n, w in self.targets(model).items()}
        self.apply_masks(model)
        self.snapshots[step] = {k: v.clone() for k, v in self.masks.items()} | {
            "sparsity": self.sparsity,
            "step": step,
        }

    def state_dict(self):
        self.calls.append(("state_dict", self.step))
        return {**self.masks, "sparsity": self.sparsity, "step": self.step}

    def load_state_dict(self, state):
        self.calls.append(("load_state_dict", state["step"]))
        self.loaded = dict(state)
        self.sparsity, self.step = state["sparsity"], state["step"]
        self.masks = {k: v for k, v in state.items() if torch.is_tensor(v)}

    def end(self, model):
        self.calls.append(("end", self.step))
        return {"sparsity": self.sparsity, "pruned_tensors": len(self.masks)}


class TokenWindows(torch.utils.data.Dataset):
    def __init__(self, vocab: int, count: int = 16, length: int = 12):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(4, vocab, (count, length), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def new_model(tokenizer):
    return build_tiny_model("llama", tokenizer).train()


def trainer_for(model, tokenizer, output_dir, callback) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        learning_rate=5e-2,  # large: the optimizer regrows masked weights unless they are re-masked
        weight_decay=0.0,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=TokenWindows(len(tokenizer)), callbacks=[callback])


def saved_state(folder) -> dict:
    """The method state in a checkpoint folder, read with safetensors directly (not load_method_state)."""
    path = folder / STATE_FILE
    with safe_open(str(path), framework="pt") as f:
        values = json.loads(f.metadata()["hf_prune_values"])
    return {**values, **load_file(path)}


def masked_positions(folder) -> dict[str, torch.Tensor]:
    """Which target weights are non-zero in a checkpoint's saved model (its own weights, no method code)."""
    weights = load_file(folder / "model.safetensors")
    return {name: weights[name] != 0 for name in weights if name.endswith(TARGET)}


@pytest.fixture(scope="module")
def uninterrupted(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    model = new_model(tokenizer)
    method = MagnitudeMask()
    callback = TrainingMethodCallback(method, name="magnitude_mask")
    trainer_for(model, tokenizer, out, callback).train()
    return model, method, callback, out


def test_hooks_run_in_order_with_step_numbers(uninterrupted):
    _, method, callback, _ = uninterrupted
    assert method.calls == [
        ("begin", 0, MAX_STEPS, True),
        ("after_optimizer_step", 1, True),  # the step's gradients are still there (gradient regrowth)
        ("after_optimizer_step", 2, True),
        ("state_dict", 2),
        ("after_optimizer_step", 3, True),
        ("after_optimizer_step", 4, True),
        ("state_dict", 4),
        ("end", 4),
    ]
    assert isinstance(callback.report, StageReport)
    report = callback.report.to_dict()
    assert report["method"] == "magnitude_mask" and report["sparsity"] == 0.5
    assert report["pruned_tensors"] == NUM_LAYERS
    assert report["seconds"] > 0


def test_mask_holds_after_training(uninterrupted):
    model, method, _, _ = uninterrupted
    targets = method.targets(model)
    assert len(targets) == NUM_LAYERS  # every layer's MLP output projection
    for name, weight in targets.items():
        zeros = int((weight == 0).sum())
        assert zeros == round(0.5 * weight.numel()), name  # exactly the final sparsity, nothing regrew
        assert torch.equal(weight != 0, method.masks[name]), name
    # The untouched weights did train (the mask is not a frozen model).
    assert any(p.requires_grad for p in model.parameters())


def test_checkpoint_holds_the_state_at_its_step(uninterrupted):
    _, method, _, out = uninterrupted
    for step in (2, 4):
        folder = out / f"checkpoint-{step}"
        state = saved_state(folder)
        expected = method.snapshots[step]
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            if torch.is_tensor(value):
                assert state[key].dtype == torch.bool and torch.equal(state[key], value), (step, key)
            else:
                assert state[key] == value, (step, key)
        # Independently of the method's own records: the saved mask is where the saved weights are non-zero.
        for name, nonzero in masked_positions(folder).items():
            assert torch.equal(state[name], nonzero), (step, name)
        assert not list(folder.glob(f".{STATE_FILE}*")), "a partial state file was left behind"
    assert saved_state(out / "checkpoint-2")["sparsity"] == 0.5  # step 2 is the update step


def test_resume_restores_the_state(uninterrupted, tokenizer, tmp_path):
    model_full, method_full, _, out = uninterrupted
    copy = tmp_path / "resume"
    shutil.copytree(out / "checkpoint-2", copy / "checkpoint-2")
    expected = saved_state(copy / "checkpoint-2")

    model = new_model(tokenizer)
    method = MagnitudeMask()
    trainer = trainer_for(model, tokenizer, copy, TrainingMethodCallback(method))
    trainer.train(resume_from_checkpoint=str(copy / "checkpoint-2"))

    assert method.calls[:2] == [("load_state_dict", 2), ("begin", 2, MAX_STEPS, True)]
    assert [c[1] for c in method.calls if c[0] == "after_optimizer_step"] == [3, 4]
    assert method.loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert (
            torch.equal(method.loaded[key], value) if torch.is_tensor(value) else method.loaded[key] == value
        )
    # The resumed run ends where the uninterrupted one did: same masks, same weights.
    for name, weight in method.targets(model).items():
        assert torch.equal(method.masks[name], method_full.masks[name])
        assert int((weight == 0).sum()) == round(0.5 * weight.numel())
    full = dict(model_full.named_parameters())
    for name, weight in model.named_parameters():
        torch.testing.assert_close(weight, full[name], rtol=1e-5, atol=1e-6)


def test_resume_without_a_saved_state_is_refused(uninterrupted, tokenizer, tmp_path):
    _, _, _, out = uninterrupted
    shutil.copytree(out / "checkpoint-2", tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2" / STATE_FILE).unlink()
    trainer = trainer_for(new_model(tokenizer), tokenizer, tmp_path, TrainingMethodCallback(MagnitudeMask()))
    with pytest.raises(HfPruneError, match=f"{STATE_FILE} is missing"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_the_callback_runs_training_methods_only():
    @dataclass
    class OneShot(OneShotMethod):
        """Not a training-time method."""

    with pytest.raises(TypeError, match="runs a TrainingMethod"):
        TrainingMethodCallback(OneShot())
