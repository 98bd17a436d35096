"""The corruption_robustness task: accuracies by hand on a model that classifies by mean brightness, the
harness refusing the wrong kind of model, the recipe naming bad fields, and ``hf-prune eval`` end to end on
tiny random ViT / ResNet folders, with and without an image processor."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from conftest import shared_asset
from hf_prune.evals.corruptions import corrupt
from hf_prune.evals.harness import (
    TaskModelMismatch,
    auto_class_for_task,
    check_task_fits,
    model_kind,
    run_task,
)
from hf_prune.evals.image_robustness import evaluate_corruption_robustness, plot_corruption_robustness
from PIL import Image
from tiny_models import save_tiny_model

from hf_prune import RecipeError, load_recipe
from hf_prune.cli import main
from hf_prune.errors import DataError
from hf_prune.image_data import read_image_set
from hf_prune.recipe import EvaluationTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")
#: Constant grey images: "dark" (label 0) below 127.5, "light" (label 1) above.
DARK, LIGHT = (100, 110, 120, 125), (140, 160, 200, 250)


def write_folder(root, levels_by_class, size=4, mode="L"):
    for name, levels in levels_by_class.items():
        (root / name).mkdir(parents=True)
        for i, level in enumerate(levels):
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(np.full(shape, level, dtype=np.uint8), mode=mode).save(root / name / f"{i}.png")
    return root


class BrightnessForImageClassification(torch.nn.Module):
    """Says "light" (1) when the mean pixel value is above ``threshold``; records how it was called."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = torch.nn.Parameter(torch.tensor(threshold))
        self.config = transformers.PretrainedConfig(num_labels=2, num_channels=1)
        self.calls, self.inputs = [], []

    def forward(self, pixel_values):
        self.calls.append((len(pixel_values), self.training, torch.is_grad_enabled()))
        self.inputs.append(pixel_values)
        score = pixel_values.mean(dim=(1, 2, 3)) - self.threshold
        return SimpleNamespace(logits=torch.stack([-score, score], dim=-1))


@pytest.fixture
def grey_folder(tmp_path):
    return write_folder(tmp_path / "grey", {"dark": DARK, "light": LIGHT})


# Brightness adds b·255 to a constant image: a dark level L is then called light once L + 255·b > 127.5
# (b = .05, .1, .15, .2, .3: 120 and 125 wrong; then 110 too; then 100 too); light images stay light.
# Contrast keeps a constant image as it is. So, over the 8 images:
BRIGHTNESS_BY_HAND = [6 / 8, 5 / 8, 4 / 8, 4 / 8, 4 / 8]


@pytest.mark.parametrize("normalised", [False, True])
def test_accuracies_by_hand_on_a_brightness_classifier(grey_folder, normalised):
    # With a processor normalising by mean 0.5 and std 0.25, the model must threshold at 0 instead of 0.5.
    processor = SimpleNamespace(do_normalize=True, image_mean=[0.5], image_std=[0.25]) if normalised else None
    model = BrightnessForImageClassification(0.0 if normalised else 0.5).train()
    result = evaluate_corruption_robustness(
        model, processor, grey_folder, corruptions=["brightness", "contrast"], batch_size=3, progress=False
    )
    assert result["clean_accuracy"] == 1.0
    assert result["per_corruption_severity"] == {
        "brightness": pytest.approx(BRIGHTNESS_BY_HAND),
        "contrast": [1.0] * 5,
    }
    assert result["per_corruption"] == {"brightness": pytest.approx(0.575), "contrast": 1.0}
    assert result["mean_corrupted_accuracy"] == pytest.approx((0.575 + 1.0) / 2)
    assert result["relative_robustness"] == pytest.approx(0.7875)
    assert result["examples"] == 8 and result["seed"] == 0 and result["severities"] == [1, 2, 3, 4, 5]
    # 11 sets (clean + 2 × 5) of 8 images in batches of 3, 3, 2; eval mode, no gradients; training restored
    assert [n for n, _, _ in model.calls] == [3, 3, 2] * 11
    assert not any(training or grad for _, training, grad in model.calls) and model.training


def test_severities_subset_limit_and_seed(grey_folder):
    model = BrightnessForImageClassification(0.5)
    # limit 4 takes the first 4 in sorted order, classes interleaved: dark 100, light 140, dark 110, light 160
    result = evaluate_corruption_robustness(
        model,
        None,
        grey_folder,
        corruptions=["brightness"],
        severities=[3, 1],
        limit=4,
        seed=5,
        progress=False,
    )
    # severity 3 (+38.25): 100 and 110 called light; severity 1 (+12.75): none
    assert result["per_corruption_severity"] == {"brightness": [0.5, 1.0]} and result["examples"] == 4
    assert result["seed"] == 5


def test_the_model_sees_the_seeded_corruption(grey_folder):
    model = BrightnessForImageClassification(0.5)
    evaluate_corruption_robustness(
        model, None, grey_folder, corruptions=["gaussian_noise"], severities=[2], seed=5, progress=False
    )
    clean = read_image_set(grey_folder).images
    assert torch.equal(model.inputs[0], clean / 255.0)
    assert torch.equal(model.inputs[1], corrupt(clean, "gaussian_noise", 2, seed=5) / 255.0)
    assert not torch.equal(model.inputs[1], corrupt(clean, "gaussian_noise", 2, seed=6) / 255.0)


def test_bad_inputs_are_named(grey_folder, tmp_path):
    model = BrightnessForImageClassification(0.5)
    with pytest.raises(DataError, match=r"unknown corruption 'fog' \(allowed: gaussian_noise"):
        evaluate_corruption_robustness(model, None, grey_folder, corruptions=["fog"], progress=False)
    with pytest.raises(DataError, match="severity must be one of 1, 2, 3, 4, 5, got 9"):
        evaluate_corruption_robustness(model, None, grey_folder, severities=[9], progress=False)
    with pytest.raises(DataError, match="distinct corruption values"):
        evaluate_corruption_robustness(model, None, grey_folder, corruptions=["contrast"] * 2, progress=False)
    colour = write_folder(tmp_path / "rgb", {"a": [10], "b": [20]}, mode="RGB")
    with pytest.raises(DataError, match=r"the images have 3 channel\(s\), the model takes 1"):
        evaluate_corruption_robustness(model, None, colour, progress=False)
    three = write_folder(tmp_path / "three", {"a": [1], "b": [2], "c": [3]})
    with pytest.raises(DataError, match="label 2 is out of range; the model has 2 labels"):
        evaluate_corruption_robustness(model, None, three, progress=False)


def test_plot_compares_several_models(grey_folder, tmp_path):
    model = BrightnessForImageClassification(0.5)
    result = evaluate_corruption_robustness(
        model, None, grey_folder, corruptions=["brightness"], progress=False
    )
    path = plot_corruption_robustness([("a", result), ("b", result)], tmp_path / "plots" / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


VIT = transformers.ViTConfig(
    image_size=28,
    patch_size=7,
    num_channels=1,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    num_labels=10,
    initializer_range=1.0,  # large weights: varied predictions, so a wrong pixel value shows
)
LLAMA = transformers.LlamaConfig(
    hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32
)


def test_the_harness_refuses_the_wrong_kind_of_model():
    with pytest.raises(
        TaskModelMismatch,
        match="'corruption_robustness' needs an image classifier .*got LlamaForCausalLM, a causal LM",
    ):
        check_task_fits("corruption_robustness", LLAMA, "LlamaForCausalLM")
    for task, words in (("perplexity", "a causal LM"), ("classification", "a sequence-classification model")):
        with pytest.raises(
            TaskModelMismatch,
            match=f"'{task}' needs {words} .it reads text.; got ViTForImageClassification, an image classifier",
        ):
            check_task_fits(task, VIT, "ViTForImageClassification")
    for task in ("multiple_choice", "vqa"):
        with pytest.raises(TaskModelMismatch):
            check_task_fits(task, VIT)
    check_task_fits("corruption_robustness", VIT, "ViTForImageClassification")
    assert model_kind(VIT, "ViTForImageClassification") == "ViTForImageClassification, an image classifier"
    assert auto_class_for_task("corruption_robustness", VIT) is transformers.AutoModelForImageClassification


def test_run_task_needs_no_processor_for_images(grey_folder):
    task = EvaluationTask(task="corruption_robustness", data=str(grey_folder), corruptions=["brightness"])
    result = run_task(BrightnessForImageClassification(0.5), None, task, progress=False)
    assert result["task"] == "corruption_robustness" and result["metric"] == "mean_corrupted_accuracy"
    assert result["mean_corrupted_accuracy"] == pytest.approx(0.575)


def test_recipe_names_bad_corruption_fields(tmp_path):
    def recipe(**entry):
        evaluate = {"task": "corruption_robustness", "data": "images", **entry}
        stages = [{"method": "layer_drop", "layers": [1, 1]}]
        return load_recipe(
            {"model": "m", "output": str(tmp_path / "o"), "stages": stages, "evaluate": [evaluate]}
        )

    with pytest.raises(
        RecipeError,
        match=r"evaluate\[0\].corruptions\[1\]: unknown corruption 'fog' \(allowed: gaussian_noise, .*pixelate\)",
    ):
        recipe(corruptions=["contrast", "fog"])
    with pytest.raises(
        RecipeError, match=r"evaluate\[0\].severities\[0\]: unknown severity 0 \(allowed: 1, 2, 3, 4, 5\)"
    ):
        recipe(severities=[0])
    with pytest.raises(RecipeError, match=r"evaluate\[0\].severities\[1\]: 2 is listed twice"):
        recipe(severities=[2, 2])
    with pytest.raises(RecipeError, match=r"evaluate\[0\].corruptions: must list at least one"):
        recipe(corruptions=[])
    with pytest.raises(RecipeError, match=r"evaluate\[0\].corruptions: is a corruption_robustness setting"):
        recipe(task="perplexity", corruptions=["contrast"])
    entry = recipe(corruptions=["pixelate"], severities=[5], seed=3).evaluate[0]
    assert (entry.corruptions, entry.severities, entry.seed) == (["pixelate"], [5], 3)


@pytest.fixture(scope="module")
def vit_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(3)  # weights whose accuracy with and without the processor's normalisation differ
    model = transformers.ViTForImageClassification(VIT)
    model.save_pretrained(root / "bare")
    model.save_pretrained(root / "processed")
    transformers.ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5]).save_pretrained(
        root / "processed"
    )
    return root


@pytest.mark.parametrize("folder", ["bare", "processed"])
def test_eval_cli_end_to_end_on_fashion_mnist(vit_folders, folder, tmp_path):
    data = shared_asset("images/fashion-mnist")
    output, plot = tmp_path / "r.json", tmp_path / "r.png"
    args = ["eval", str(vit_folders / folder), "--task", "corruption_robustness", "--data", str(data)]
    args += ["--limit", "40", "--quiet", "--output", str(output), "--plot", str(plot), "--batch-size", "16"]
    assert main(args) == 0
    result = json.loads(output.read_text())
    assert result["task"] == "corruption_robustness" and result["metric"] == "mean_corrupted_accuracy"
    assert (
        set(result["per_corruption_severity"]) == set(result["per_corruption"])
        and len(result["per_corruption"]) == 10
    )
    assert all(len(v) == 5 for v in result["per_corruption_severity"].values()) and result["examples"] == 40
    assert result["mean_corrupted_accuracy"] == pytest.approx(
        np.mean([v for values in result["per_corruption_severity"].values() for v in values])
    )
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # The clean accuracy by hand: the IDX file read with numpy, scaled (and normalised as the processor says).
    import gzip

    with gzip.open(data / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:40]
    with gzip.open(data / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:40]
    scaled = torch.tensor(images / 255.0, dtype=torch.float32)
    model = transformers.AutoModelForImageClassification.from_pretrained(vit_folders / folder).eval()
    with torch.no_grad():
        raw, normalised = (
            model(pixel_values=x).logits.argmax(-1).numpy() for x in (scaled, (scaled - 0.5) / 0.5)
        )
    accuracy = {"bare": float((raw == labels).mean()), "processed": float((normalised == labels).mean())}
    assert accuracy["bare"] != accuracy["processed"]  # so a processor ignored (or wrongly used) would show
    assert result["clean_accuracy"] == pytest.approx(accuracy[folder])


def test_eval_cli_compare_writes_the_plot_into_the_report(tmp_path, capsys):
    data = write_folder(tmp_path / "rgb", {"cat": [30, 60, 90], "dog": [150, 200, 250]}, size=8, mode="RGB")
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = transformers.ResNetConfig(
            num_channels=3,
            embedding_size=8,
            hidden_sizes=[8, 8],
            depths=[1, 1],
            layer_type="basic",
            num_labels=2,
        )
        transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / f"resnet{seed}")
        folders.append(str(tmp_path / f"resnet{seed}"))
    report, plot = tmp_path / "report", tmp_path / "both.png"
    args = [
        "eval",
        folders[1],
        "--task",
        "corruption_robustness",
        "--data",
        str(data),
        "--compare",
        folders[0],
    ]
    args += [
        "--report-dir",
        str(report),
        "--plot",
        str(plot),
        "--corruptions",
        "contrast",
        "pixelate",
        "--quiet",
    ]
    assert main(args + ["--severities", "1", "5", "--seed", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pruned"]["per_corruption_severity"].keys() == {"contrast", "pixelate"}
    assert result["original"]["severities"] == [1, 5] and result["original"]["seed"] == 2
    assert "![corruption robustness](corruption_robustness.png)" in (report / "report.md").read_text()
    assert (report / "corruption_robustness.png").is_file() and plot.is_file()


def test_eval_cli_refusals(vit_folders, grey_folder, tmp_path, capsys):
    vit = str(vit_folders / "bare")
    assert (
        main(
            [
                "eval",
                vit,
                "--task",
                "corruption_robustness",
                "--data",
                str(grey_folder),
                "--corruptions",
                "fog",
            ]
        )
        == 2
    )
    assert "eval.corruptions[0]: unknown corruption 'fog' (allowed: gaussian_noise" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    assert main(["eval", vit, "--task", "perplexity", "--data", str(text)]) == 2
    assert (
        "'perplexity' needs a causal LM (it reads text); got ViTForImageClassification"
        in capsys.readouterr().err
    )
    llama = str(save_tiny_model("llama", tmp_path / "llama"))
    assert main(["eval", llama, "--task", "corruption_robustness", "--data", str(grey_folder)]) == 2
    assert "'corruption_robustness' needs an image classifier" in capsys.readouterr().err
    assert main(["eval", llama, "--task", "perplexity", "--data", str(text), "--plot", "x.png"]) == 2
    assert "--plot draws corruption_robustness results" in capsys.readouterr().err


def test_a_train_recipe_scores_the_model_before_and_after(grey_folder, tmp_path):
    config = transformers.ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], layer_type="basic", num_labels=2
    )
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "resnet")  # no processor
    evaluate = {
        "task": "corruption_robustness",
        "data": str(grey_folder),
        "corruptions": ["contrast", "shot_noise"],
    }
    recipe = {
        "model": str(tmp_path / "resnet"),
        "output": str(tmp_path / "out"),
        "train": {"data": str(grey_folder), "arguments": {"max_steps": 2, "per_device_train_batch_size": 4}},
        "stages": [{"method": "gmp", "final_sparsity": 0.5, "end_step": 2, "frequency": 1}],
        "evaluate": [{**evaluate, "severities": [1, 5]}],
    }
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    assert main(["train", str(tmp_path / "r.json"), "--quiet"]) == 0
    entry = json.loads((tmp_path / "out" / "hf_prune.json").read_text())["evaluation"][0]
    assert (entry["task_type"], entry["metric"]) == ("image-classification", "mean_corrupted_accuracy")
    for result in (entry["original"], entry["pruned"]):
        assert {k: len(v) for k, v in result["per_corruption_severity"].items()} == {
            "contrast": 2,
            "shot_noise": 2,
        }
    assert "type: image-classification" in (tmp_path / "out" / "README.md").read_text()
