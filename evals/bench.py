"""Speed, memory, size and analytic FLOPs of models side by side: the engine behind ``hf-prune bench``.

results = benchmark_models({"original": (m0, tok0, "out/orig"), "pruned": (m1, tok1, None)},
                           BenchSettings(), baseline="original")
print(format_bench_table(results, "original"))
"""

from __future__ import annotations

import ctypes
import inspect
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from ..adapters import count_parameters, get_adapter
from .flops import analytic_flops_per_token

#: Peak memory is the increase during a run (activations, KV cache, workspace); weights are ``weights_mib``.
#: An absolute CUDA peak would count every model loaded in this process, hence the difference.
CPU_MEMORY = "CPU peak RSS increase over the RSS before each run (psutil, sampled every 1 ms)"
CUDA_MEMORY = "CUDA torch.cuda.max_memory_allocated minus memory allocated before each run"
#: Leaves that get a ratio vs the baseline (value / baseline value; for tokens_per_s that is the speed-up).
RATIO_KEYS = {
    "parameters",
    "weights_mib",
    "disk_bytes",
    "median_ms",
    "peak_memory_mib",
    "tokens_per_s",
    "params_active",
    "prefill_flops_per_token",
    "decode_flops_per_token",
    "vision_flops_per_image",
}


@dataclass
class BenchSettings:
    seq_lens: tuple[int, ...] = (128, 512, 1024)  # prefill lengths (clipped to the model's max positions)
    batch_size: int = 1
    decode_tokens: int = 64
    warmup: int = 1
    repeats: int = 5  # medians over repeats
    image: bool | None = None  # vision-language: prefill with one image (None: if it has a vision tower)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory increase during a block, in bytes (``.peak``): CUDA allocator, or sampled RSS on CPU.

    On CPU, freed heap is first handed back to the OS (glibc ``malloc_trim``) so the increase reflects
    this block's allocations rather than memory an earlier run left in the allocator.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop, self._rss = (
            device,
            0,
            threading.Event(),
            psutil.Process().memory_info,
        )

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, self._rss().rss)

    def __enter__(self) -> PeakMemory:
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.base = self._max = self._rss().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, self._rss().rss) - self.base


class _StepClock:
    """A logits processor that only notes the time of each generation step (after each forward)."""

    def __init__(self, device: torch.device, steps: int):
        self.device, self.steps, self.times = device, steps, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.times or len(self.times) == self.steps - 1:
            _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def _image_size(processor: Any) -> tuple[int, int]:
    """(height, width) the image processor produces: its crop size, else its size; 336 if it names none."""
    size = (
        getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None)
    ) or processor.size
    height = size.get("height") or size.get("shortest_edge") or 336
    return int(height), int(size.get("width") or height)


def _make_inputs(
    model: Any, preprocessor: Any, seq_len: int, batch: int, image: bool
) -> dict[str, torch.Tensor]:
    """Random token ids (fixed seed; never the image token), after one image's expanded placeholders."""
    config, generator = model.config, torch.Generator().manual_seed(seq_len)
    adapter = get_adapter(config)
    vocab, image_id = adapter.text_config(config).vocab_size, adapter.image_token_id(config)
    inputs: dict[str, torch.Tensor] = {}
    if image:
        import numpy as np
        from PIL import Image

        size = (*_image_size(preprocessor.image_processor), 3)
        picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8))
        token = getattr(preprocessor, "image_token", "<image>")
        inputs = dict(preprocessor(images=[picture] * batch, text=[token] * batch, return_tensors="pt"))
    prefix = inputs.get("input_ids", torch.empty(batch, 0, dtype=torch.long))
    skip = image_id is not None and image_id < vocab
    ids = torch.randint(0, vocab - skip, (batch, max(seq_len - prefix.shape[1], 0)), generator=generator)
    if skip:
        ids[ids >= image_id] += 1
    inputs["input_ids"] = torch.cat([prefix, ids], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def _sizes(model: Any, folder: Any) -> dict[str, Any]:
    """Unique parameters, bytes of parameters + buffers (MiB), *.safetensors bytes in ``folder`` (or None)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    disk = (
        None
        if folder is None or not Path(folder).is_dir()
        else sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    )
    return {
        "parameters": count_parameters(model),
        "disk_bytes": disk,
        "weights_mib": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
    }


def _summary(values: list[float]) -> tuple[float, float]:
    """Median and inter-quartile range."""
    if len(values) < 2:
        return values[0], 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q[2] - q[0]


class _Case:
    """One model under test: its inputs, its timings, its result."""

    def __init__(self, name: str, model: Any, preprocessor: Any, folder: Any, settings: BenchSettings):
        self.name, self.model, self.settings, config = name, model, settings, model.config
        self.device = torch.device(model.device)
        self.adapter = adapter = get_adapter(config)
        image = (
            adapter.is_vision_language
            if settings.image is None
            else settings.image and adapter.is_vision_language
        )
        if image and preprocessor is None and settings.image:
            raise ValueError(f"{name}: an image prefill needs the model's processor")
        self.image = bool(image and preprocessor is not None)
        max_pos = getattr(adapter.text_config(config), "max_position_embeddings", None) or 10**9
        keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.forward_kwargs = {"use_cache": True, **({"logits_to_keep": 1} if keep else {})}
        self.inputs = {
            s: _make_inputs(model, preprocessor, min(s, max_pos), settings.batch_size, self.image)
            for s in settings.seq_lens
        }
        prompt = max(1, min(min(settings.seq_lens), max_pos - settings.decode_tokens))
        self.inputs["decode"] = _make_inputs(model, preprocessor, prompt, settings.batch_size, self.image)
        gen = model.generation_config
        eos = gen.eos_token_id[0] if isinstance(gen.eos_token_id, list) else gen.eos_token_id
        pad = gen.pad_token_id if gen.pad_token_id is not None else (eos if eos is not None else 0)
        self.generate_kwargs = dict(
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad,
            max_new_tokens=settings.decode_tokens,
            min_new_tokens=settings.decode_tokens,
        )
        self.times: dict[Any, list[float]] = {key: [] for key in self.inputs}
        self.peak_mib: dict[Any, float] = {}
        lengths = {key: inputs["input_ids"].shape[1] for key, inputs in self.inputs.items()}
        self.result: dict[str, Any] = {
            "model_type": config.model_type,
            "dtype": str(model.dtype).removeprefix("torch."),
            "device": str(self.device),
            "layers": adapter.num_layers(config),
            "image": self.image,
            **_sizes(model, folder),
            "prefill": {str(s): {"seq_len": lengths[s]} for s in settings.seq_lens},
            "decode": {"prompt_len": lengths["decode"], "new_tokens": settings.decode_tokens},
            "flops": {
                "decode_prompt" if k == "decode" else str(k): analytic_flops_per_token(
                    config, n, image_tokens=self._image_tokens(key=k)
                )
                for k, n in lengths.items()
            },
        }
        if self.image:
            pixels = self.inputs["decode"]["pixel_values"]
            crops = pixels.shape[1] if pixels.dim() == 5 else 1
            per_crop = self.result["flops"]["decode_prompt"]["vision_flops_per_crop"]
            self.result.update(crops_per_image=crops, vision_flops_per_image=crops * per_crop)

    @torch.inference_mode()
    def _image_tokens(self, key: Any) -> int | None:
        """Image placeholders in the first row of one input (None without an image)."""
        image_id = self.adapter.image_token_id(self.model.config)
        if not self.image or image_id is None:
            return None
        return int((self.inputs[key]["input_ids"][0] == image_id).sum())

    def run(self, key: Any) -> float:
        """One measurement: prefill (ms) at seq len ``key``, or decode (tokens/s) when ``key == "decode"``."""
        _sync(self.device)
        start = time.perf_counter()
        if key != "decode":
            self.model(**self.inputs[key], **self.forward_kwargs)
            _sync(self.device)
            return (time.perf_counter() - start) * 1000
        clock = _StepClock(self.device, self.settings.decode_tokens)
        self.model.generate(**self.inputs[key], logits_processor=[clock], **self.generate_kwargs)
        _sync(self.device)
        batch = self.inputs[key]["input_ids"].shape[0]
        if len(clock.times) >= 2:  # steps 2..N: decode only, the prefill ends at the first step
            return batch * (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
        return batch * self.settings.decode_tokens / (time.perf_counter() - start)

    def step(self, phase: str, key: Any) -> None:
        if phase == "memory":
            with PeakMemory(self.device) as peak:
                self.run(key)
            self.peak_mib[key] = peak.peak / 2**20
        elif phase == "time":
            self.times[key].append(self.run(key))
        else:
            self.run(key)

    def finish(self) -> dict[str, Any]:
        for s in self.settings.seq_lens:
            median, iqr = _summary(self.times[s])
            self.result["prefill"][str(s)].update(
                median_ms=median, iqr_ms=iqr, times_ms=self.times[s], peak_memory_mib=self.peak_mib[s]
            )
        median, iqr = _summary(self.times["decode"])
        self.result["decode"].update(
            tokens_per_s=median,
            iqr_tokens_per_s=iqr,
            tokens_per_s_runs=self.times["decode"],
            peak_memory_mib=self.peak_mib["decode"],
        )
        return self.result


def _ratios(value: dict, base: dict) -> dict:
    out: dict[str, Any] = {}
    for key, v in value.items():
        b = base.get(key)
        if isinstance(v, dict) and isinstance(b, dict):
            if sub := _ratios(v, b):
                out[key] = sub
        elif key in RATIO_KEYS and isinstance(v, (int, float)) and isinstance(b, (int, float)) and b:
            out[key] = v / b
    return out


def add_ratios(results: dict, baseline: str) -> dict:
    """Give every model a ``ratios`` dict mirroring its figures: value / baseline value."""
    if baseline not in results["models"]:
        raise KeyError(f"baseline {baseline!r} is not among the models: {', '.join(results['models'])}")
    base = results["models"][baseline]
    for res in results["models"].values():
        res["ratios"] = _ratios({k: v for k, v in res.items() if k != "ratios"}, base)
    results["baseline"] = baseline
    return results


def benchmark_models(
    models: dict[str, tuple[Any, Any, Any]],
    settings: BenchSettings,
    *,
    baseline: str | None = None,
    progress: bool = True,
) -> dict:
    """Benchmark ``{name: (model, preprocessor, folder or None)}`` on the devices the models sit on.

    Returns JSON-serialisable ``{"settings", "memory_metric", "baseline", "models": {name: result}}``; a
    result holds ``parameters`` (unique), ``weights_mib``, ``disk_bytes`` (*.safetensors in the folder, or
    None), ``prefill[str(seq_len)]`` = {seq_len (actual), median_ms, iqr_ms, times_ms, peak_memory_mib},
    ``decode`` = {prompt_len, new_tokens, tokens_per_s, iqr_tokens_per_s, tokens_per_s_runs,
    peak_memory_mib} (greedy ``generate``; tokens/s summed over the batch, over steps 2..N: the prefill is excluded),
    ``flops[str(seq_len) | "decode_prompt"]`` (``analytic_flops_per_token`` at the actual length) and,
    for an image prefill, ``crops_per_image`` / ``vision_flops_per_image``. Peak memory comes from one
    extra pass per measurement, outside the timed runs (``memory_metric`` says how it was taken). With
    ``baseline``, each result also gets ``ratios`` (see ``add_ratios``).
    """
    from tqdm.auto import tqdm

    cases = [_Case(name, *spec, settings) for name, spec in models.items()]
    keys = [*settings.seq_lens, "decode"]
    # Warm-up, one memory pass (outside the timed runs), then the timed repeats; each phase interleaved
    # (every model at one measurement before the next), in reversed order every other round.
    rounds = [("warmup", r) for r in range(settings.warmup)] + [("memory", 0)]
    rounds += [("time", r) for r in range(settings.repeats)]
    with tqdm(total=len(rounds) * len(keys) * len(cases), desc="bench", disable=not progress) as bar:
        for phase, r in rounds:
            for key in keys:
                for case in cases if r % 2 == 0 else cases[::-1]:
                    case.step(phase, key)
                    bar.update()
    devices = {case.device.type for case in cases}
    results = {
        "settings": asdict(settings),
        "memory_metric": CUDA_MEMORY
        if devices == {"cuda"}
        else CPU_MEMORY
        if devices == {"cpu"}
        else f"per device: {CUDA_MEMORY}; {CPU_MEMORY}",
        "baseline": None,
        "models": {case.name: case.finish() for case in cases},
    }
    return add_ratios(results, baseline) if baseline else results


def prefill_latency_ms(results: dict) -> dict[str, dict[int, float]]:
    """``{model: {actual seq len: median prefill ms}}`` (for latency-vs-length plots)."""
    return {
        name: {entry["seq_len"]: entry["median_ms"] for entry in reversed(res["prefill"].values())}
        for name, res in results["models"].items()
    }


def _human(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}{unit}"
    return f"{value:.0f}{unit}" if float(value).is_integer() else f"{value:.2f}{unit}"


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def format_bench_table(results: dict, baseline: str | None) -> str:
    """Fixed-width table: a row per figure, a column per model, then ``model/baseline`` ratio columns.

    With ``baseline`` the ratios are (re)computed into ``results`` first, see ``add_ratios``.
    """
    if baseline and results.get("baseline") != baseline:
        add_ratios(results, baseline)
    models, s = results["models"], results["settings"]
    names, first = list(models), next(iter(models.values()))
    others = [n for n in names if n != baseline] if baseline else []
    mib = lambda v: f"{v:.1f} MiB"  # noqa: E731
    rows: list[tuple[str, tuple[str, ...], Any]] = [
        ("parameters", ("parameters",), _human),
        ("weights in memory", ("weights_mib",), mib),
        ("on-disk (safetensors)", ("disk_bytes",), lambda v: _human(v, "B")),
    ]
    for key, entry in first["prefill"].items():
        n = entry["seq_len"] if str(entry["seq_len"]) == key else f"{entry['seq_len']} (asked {key})"
        rows += [
            (f"prefill ms @{n} (median ±IQR)", ("prefill", key, "median_ms"), None),
            (f"prefill peak mem increase @{n}", ("prefill", key, "peak_memory_mib"), mib),
            (f"prefill FLOPs/token @{n}", ("flops", key, "prefill_flops_per_token"), _human),
        ]
    n = first["decode"]["prompt_len"]
    rows += [
        (f"decode tokens/s (after {n} tokens)", ("decode", "tokens_per_s"), lambda v: f"{v:.1f}"),
        ("decode peak mem increase", ("decode", "peak_memory_mib"), mib),
        (f"decode FLOPs/token @{n}", ("flops", "decode_prompt", "decode_flops_per_token"), _human),
        ("active params/token", ("flops", "decode_prompt", "params_active"), _human),
    ]
    if any("vision_flops_per_image" in m for m in models.values()):
        rows.append(("vision FLOPs/image", ("vision_flops_per_image",), _human))
    table = [["figure", *names, *(f"{n}/{baseline}" for n in others)]]
    for label, path, fmt in rows:
        values = [_get(models[name], path) for name in names]
        if fmt is None:  # latency: median ± IQR
            cells = [
                f"{v:.2f} ±{_get(models[m], (*path[:-1], 'iqr_ms')):.2f}"
                for m, v in zip(names, values, strict=False)
            ]
        else:
            cells = ["-" if v is None else fmt(v) for v in values]
        ratios = [_get(models[name].get("ratios", {}), path) for name in others]
        table.append([label, *cells, *("-" if r is None else f"{r:.3f}x" for r in ratios)])
    widths = [max(map(len, column)) for column in zip(*table, strict=False)]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=False))
        )
        for row in table
    ]
    devices = ", ".join(sorted({f"{m['device']} {m['dtype']}" for m in models.values()}))
    head = [
        f"bench: {devices} · batch {s['batch_size']} · median of {s['repeats']} after {s['warmup']} warm-up · "
        f"decode {s['decode_tokens']} tokens",
        f"peak memory: {results['memory_metric']} (weights: 'weights in memory')",
    ]
    note = [f"ratios: model / {baseline} (for tokens/s: the speed-up)"] if others else []
    return "\n".join([*head, lines[0], "-" * len(lines[0]), *lines[1:], *note])
