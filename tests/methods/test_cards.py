"""CARDs: lottery rounds per member (global 20% of what remains, capped at the target), rewinding (LRR
replays the schedule on the trained weights, LTR restores the stored ones), members' domains, seeds and
initialisation, and the source model left alone."""

from __future__ import annotations

import pytest
import torch
import transformers
from hf_prune.integrations import PruningCallback, train_cards
from transformers import TrainerCallback

from hf_prune.errors import ConfigFieldError, RecipeError
from hf_prune.image_data import ImageSet
from hf_prune.methods.robust.cards import CardsConfig
from hf_prune.methods.sparsity.lottery import LotteryConfig, rounds_to_reach

STEPS = 3


def tiny_vit() -> transformers.ViTForImageClassification:
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config)


def tiny_images(n: int = 24) -> ImageSet:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=generator, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n) % 3, ["a", "b", "c"])


def arguments(tmp_path) -> dict:
    return {
        "output_dir": str(tmp_path / "runs"),
        "max_steps": STEPS,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 8,
        "disable_tqdm": True,
        "use_cpu": True,
        "logging_strategy": "no",
    }


def targeted(model) -> dict[str, torch.Tensor]:
    """Every Linear / Conv weight but the classifier head (the default targets and exclude)."""
    return {
        f"{name}.weight": module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name != "classifier"
    }


class Rounds(TrainerCallback):
    """Per run: the targeted weights and learning rate at the first step, and the weights at the end
    (before the lottery prunes: its callback is added after this one)."""

    def __init__(self):
        self.first, self.first_lr, self.end, self.models = [], [], [], []

    def on_step_end(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        if state.global_step == 1:
            self.first_lr.append(lr_scheduler.get_last_lr()[0])

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.first.append(targeted(model))
            self.models.append(id(model))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.end.append(targeted(model))


def zeros(weights: dict[str, torch.Tensor]) -> int:
    return sum(int((w == 0).sum()) for w in weights.values())


def test_rounds_to_reach_counts_rounds_of_a_fifth():
    # 1 - 0.8^R: R = 1 → 0.2, 4 → 0.5904, 14 → 0.956 (the first at or above 0.95), by hand
    assert rounds_to_reach(0.2, 0.2) == 1
    assert rounds_to_reach(0.5, 0.2) == 4
    assert rounds_to_reach(0.95, 0.2) == 14
    assert rounds_to_reach(0.96, 0.2) == 15


def test_each_round_prunes_a_fifth_of_what_remains_globally_up_to_the_target(tmp_path):
    model = tiny_vit()
    probe = Rounds()
    config = {"members": 1, "augmentations": ["none"], "final_sparsity": 0.5}
    result = train_cards(model, tiny_images(), config, arguments=arguments(tmp_path), callbacks=[probe])
    assert len(probe.first) == 5  # rounds_to_reach(0.5) = 4 prunings, 5 runs
    total = sum(w.numel() for w in probe.first[0].values())
    for r in range(1, 5):
        expected = round(min(1 - 0.8**r, 0.5) * total)
        assert zeros(probe.first[r]) == expected, r
        # The newly pruned ones are the smallest |w| still alive at the end of run r - 1, over all weights
        trained = probe.end[r - 1]
        alive = sorted(
            (abs(v), n, i)
            for n, t in trained.items()
            for i, v in enumerate(t.flatten().tolist())
            if not (r > 1 and probe.first[r - 1][n].flatten()[i] == 0)
        )
        newly = {(n, i) for _, n, i in alive[: expected - zeros(probe.first[r - 1])]}
        for name, weight in probe.first[r].items():
            was_zero = (
                probe.first[r - 1][name].flatten() == 0 if r > 1 else torch.zeros(weight.numel(), dtype=bool)
            )
            now_zero = (weight.flatten() == 0).tolist()
            assert now_zero == [bool(was_zero[i]) or (name, i) in newly for i in range(weight.numel())], name
    member = result.members[0]
    assert zeros(targeted(member)) == round(0.5 * total)  # the last run kept the mask
    assert result.report["members"][0]["sparsity"] == pytest.approx(0.5, abs=1e-4)


def test_lrr_replays_the_schedule_on_the_trained_weights(tmp_path):
    probe = Rounds()
    config = {"members": 1, "augmentations": ["none"], "final_sparsity": 0.36}
    train_cards(tiny_vit(), tiny_images(), config, arguments=arguments(tmp_path), callbacks=[probe])
    assert len(probe.first_lr) == 3 and len(set(probe.first_lr)) == 1  # the same first-step rate each run
    for r in (1, 2):
        for name, first in probe.first[r].items():
            kept = first != 0
            assert torch.equal(first[kept], probe.end[r - 1][name][kept]), name


def test_ltr_rewinds_the_survivors_to_the_initial_weights(tmp_path):
    probe = Rounds()
    config = {"members": 1, "augmentations": ["none"], "final_sparsity": 0.36, "rewind": "weights"}
    config["member_init"] = "shared"
    model = tiny_vit()
    initial = targeted(model)
    train_cards(model, tiny_images(), config, arguments=arguments(tmp_path), callbacks=[probe])
    for r in (1, 2):
        for name, first in probe.first[r].items():
            kept = first != 0
            assert torch.equal(first[kept], initial[name][kept]), name
            assert not torch.equal(probe.end[r - 1][name], initial[name])  # training did move them


def test_members_domains_initialisations_and_the_source_left_alone(tmp_path):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = Rounds()
    config = {"members": 3, "augmentations": ["augmix", "gaussian"], "final_sparsity": 0.2}
    result = train_cards(model, tiny_images(), config, arguments=arguments(tmp_path), callbacks=[probe])
    assert result.domains == ["augmix", "gaussian", "augmix"]
    assert [m["domain"] for m in result.report["members"]] == result.domains
    assert len(set(probe.models)) == 3 and id(model) not in probe.models
    # reseeded: member i starts from a fresh initialisation under seed + i (by hand: torch.manual_seed)
    for i in range(3):
        torch.manual_seed(i)
        fresh = targeted(transformers.ViTForImageClassification(model.config))
        assert all(torch.equal(probe.first[2 * i][n], fresh[n]) for n in fresh), i
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_shared_members_start_from_the_models_weights(tmp_path):
    model = tiny_vit()
    probe = Rounds()
    config = {"members": 2, "augmentations": ["none"], "final_sparsity": 0.2, "member_init": "shared"}
    train_cards(model, tiny_images(), config, arguments=arguments(tmp_path), callbacks=[probe])
    start = targeted(model)
    for run in (0, 2):
        assert all(torch.equal(probe.first[run][n], start[n]) for n in start)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("members", 0, "must be an integer >= 1"),
        ("members", -2, "must be an integer >= 1"),
        ("augmentations", ["augmix", "cutout"], "unknown augmentation 'cutout'"),
        ("augmentations", [], "at least one"),
        ("gating", "best", "uniform, spectral"),
        ("member_init", "copy", "shared, reseeded"),
        ("final_sparsity", 1.0, "(0, 1)"),
        ("rewind", "both", "learning_rate | weights"),
    ],
)
def test_bad_configs_name_the_key(field, value, message):
    with pytest.raises(ConfigFieldError) as error:
        CardsConfig(**{field: value})
    assert error.value.field == field and message in str(error.value)


def test_a_lottery_whose_rounds_cannot_reach_its_final_sparsity_is_refused():
    with pytest.raises(ConfigFieldError, match="it takes 14"):
        LotteryConfig(rounds=5, final_sparsity=0.95)


def test_the_pruning_callback_refuses_cards():
    with pytest.raises(RecipeError, match="train_cards"):
        PruningCallback({"method": "cards", "members": 2})
