"""ReplaceMe and layer_drop on the layer-by-layer engine, in one pass over the calibration data.

The pass runs decoder layer i on every batch and caches its output h_i and (ReplaceMe) its MLP output M_i
in the activation store. Angular distances d(l, l+n) are summed as soon as h_{l+n} exists. Once the
cut is chosen, its map's normal equations read M_l, h_l and h_{l+n} from the cache: no second forward pass.
A later cut sees the model as the earlier ones left it, so the layers from the earlier cut's kept layer
(folded) to the later cut's last one are run again, as the in-memory path does.

``cut_selection: residual`` (ReplaceMe only) fits a map for every candidate cut on 4 of every 5 real
calibration tokens and keeps the cut with the lowest relative residual ‖M·T − R‖² / ‖R‖² on the fifth.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from ...engine.activation_store import ActivationStore
from ...engine.distributed import all_reduce_int, all_reduce_sum
from ...engine.layers import LayerRunner
from ...engine.plan import SequentialPlan
from ...errors import CalibrationError
from .cuts import Cut, DepthCutConfig, angular_distance_sum, choose_cuts, distance_rows
from .estimators import NormalEquations

#: residual cut selection: every HOLDOUT_EVERY-th real token of a batch is held out
HOLDOUT_EVERY = 5


def plan_depth_cuts(
    config: DepthCutConfig, runner: LayerRunner, store: ActivationStore, context: Any, *, fit_map: bool
) -> SequentialPlan:
    adapter = context.adapter
    total = runner.num_layers
    batches = runner.batches
    masks = [b.attention_mask for b in batches]
    selection = getattr(config, "cut_selection", "angular")
    if config.layers is not None and not fit_map:  # explicit layers, nothing to calibrate
        first, last = config.layers
        removed = list(range(first, last + 1))
        cut = Cut(first - 1, removed, []).to_dict()
        report = {"layers_before": total, "layers_after": total - len(removed), "removed_layers": removed}
        return SequentialPlan(
            {**report, "cuts": [cut], "candidate_distances": None},
            removed_layers=removed,
            structural_edit=lambda model: adapter.remove_layers(model, removed),
        )
    if config.layers is not None:
        block, deepest = None, config.layers[1]
    else:
        block, deepest = config.num_layers // config.num_cuts, total - 1
    distance_sums = torch.zeros(total - block if block else 0, dtype=torch.float64)
    rows = 0
    hidden = runner.layer_inputs()
    store.put("h-1", hidden)
    for i in tqdm(range(deepest + 1), desc="layers", disable=not context.progress, leave=False):
        cached = store.get(f"h{i}")
        mlp = store.get(f"m{i}") if fit_map else None
        if cached is None or (fit_map and mlp is None):
            watch = {"mlp": adapter.mlp(runner.layer(i))} if fit_map else None
            cached, watched = runner.run_layer(i, hidden, watch=watch)
            store.put(f"h{i}", cached)
            if fit_map:
                store.put(f"m{i}", watched["mlp"])
        else:
            store.reused.append(f"layer {i}")
        hidden = cached
        if selection == "angular" and block and i >= block:
            before = store.get(f"h{i - block}")
            for b, mask in enumerate(masks):
                a_rows = distance_rows(before[b], mask, config.distance_tokens)
                distance_sums[i - block] += angular_distance_sum(
                    a_rows, distance_rows(hidden[b], mask, config.distance_tokens)
                )
                if i == block:
                    rows += a_rows.shape[0]

    candidate: dict[str, Any] = {}
    if config.layers is not None:
        first, last = config.layers
        cuts = [Cut(first - 1, list(range(first, last + 1)), [])]
    elif selection == "residual":
        scores = residual_scores(store, masks, block, total, config, runner)
        cuts = choose_cuts(scores, block, config.num_cuts)
        candidate["candidate_residuals"] = [round(float(s), 6) for s in scores]
    elif selection == "loss":
        scores = loss_scores(store, masks, block, total, config, runner)
        cuts = choose_cuts(scores, block, config.num_cuts)
        candidate["candidate_losses"] = [round(float(s), 6) for s in scores]
    else:
        distances = all_reduce_sum(distance_sums) / all_reduce_int(rows)
        cuts = choose_cuts(distances, block, config.num_cuts)
        candidate["candidate_distances"] = [round(float(d), 6) for d in distances]

    removed = sorted(i for c in cuts for i in c.removed)
    plan = SequentialPlan(
        report={}, removed_layers=removed, structural_edit=lambda model: adapter.remove_layers(model, removed)
    )
    reports = []
    frontier: tuple[int, list[torch.Tensor]] | None = None  # (layer index, output) of the edited model
    for cut in cuts:
        entry = cut.to_dict()
        if fit_map:
            if frontier is None:
                inputs = store.get(f"h{cut.kept - 1}")
                mlp_out, kept_out, target = cut_activations(store, cut.kept, cut.removed[-1])
            else:
                inputs, mlp_out, kept_out, target = _rerun_span(
                    runner, adapter, frontier, cut, plan.removed_layers
                )
            transform, stats = _fit(config, mlp_out, kept_out, target, masks, context)
            edit = _folding_edit(adapter, transform)
            plan.layer_edits[cut.kept] = edit
            names = [name for name, _, _ in adapter.mlp_output_projections(runner.layer(cut.kept))]
            entry.update(stats, folded_into=names)
            if cut is not cuts[-1] or runner.edits_in_place:
                # A later cut needs the folded layer's outputs; an in-memory model is edited here, once.
                with runner.editable_layer(cut.kept) as layer:
                    edit(layer)
                    if cut is not cuts[-1]:
                        folded, _ = runner.run_layer(cut.kept, inputs, layer=layer)
                        frontier = (cut.removed[-1], folded)
        reports.append(entry)
    plan.report = {
        **({"estimator": config.estimator} if fit_map else {}),
        "layers_before": total,
        "layers_after": total - len(plan.removed_layers),
        "removed_layers": plan.removed_layers,
        "cuts": reports,
        **({"cut_selection": selection} if fit_map else {}),
        **(candidate or {"candidate_distances": None}),
    }
    return plan


def _fit(config: Any, mlp_out, kept_out, target, masks, context) -> tuple[torch.Tensor, dict[str, Any]]:
    from .replaceme import MapFit

    fit = MapFit(kept_out[0].shape[-1], config, kept_out[0].device)
    for m, h, t, mask in zip(mlp_out, kept_out, target, masks, strict=True):
        fit.add(m, h, t, mask)
    return fit.solve(context.progress)


def _folding_edit(adapter: Any, transform: torch.Tensor):
    from .replaceme import fold_linear_map_into_mlp_output

    def fold(layer: torch.nn.Module) -> None:
        fold_linear_map_into_mlp_output(adapter, layer, transform)

    return fold


def _rerun_span(
    runner: LayerRunner, adapter: Any, frontier: tuple[int, list[torch.Tensor]], cut: Cut, removed: list[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The activations a later cut needs in the model the earlier cuts left: run the kept layers after the
    frontier up to ``cut.kept`` (its MLP output watched), then the layers ``cut`` removes."""
    index, hidden = frontier
    inputs = hidden
    watched: dict[str, list[torch.Tensor]] = {}
    for j in range(index + 1, cut.kept + 1):
        if j in removed:
            continue
        inputs = hidden
        watch = {"mlp": adapter.mlp(runner.layer(j))} if j == cut.kept else None
        hidden, watched = runner.run_layer(j, hidden, watch=watch)
    kept_out, target = hidden, hidden
    for j in cut.removed:
        target, _ = runner.run_layer(j, target)
    return inputs, watched["mlp"], kept_out, target


def cut_activations(store: ActivationStore, kept: int, last: int) -> tuple[list, list, list]:
    """The cached MLP output and output of layer ``kept``, and the output of layer ``last`` (the target)."""
    return store.get(f"m{kept}"), store.get(f"h{kept}"), store.get(f"h{last}")


def residual_scores(
    store: ActivationStore,
    masks: list[torch.Tensor],
    block: int,
    total: int,
    config: Any,
    runner: LayerRunner,
) -> torch.Tensor:
    """For every start l: the held-out relative residual of the map fitted on the other tokens."""
    scores = torch.zeros(total - block, dtype=torch.float64)
    for start in range(total - block):
        mlp_out, kept_out, target = cut_activations(store, start, start + block)
        dim = kept_out[0].shape[-1]
        fit, held = NormalEquations(dim), NormalEquations(dim)
        for m, h, t, mask in zip(mlp_out, kept_out, target, masks, strict=True):
            mask = mask.to(h.device).bool()
            m_rows, h_rows, t_rows = m[mask], h[mask], t[mask]
            residual = t_rows.double() - (h_rows.double() - m_rows.double())
            out = torch.arange(m_rows.shape[0], device=m_rows.device) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
            fit.add(m_rows[~out], residual[~out])
            held.add(m_rows[out], residual[out])
        fit.all_reduce()
        held.all_reduce()
        transform, _ = fit.solve(config.ridge)
        scores[start] = held.squared_error(transform) / max(float(held.target_sq), 1e-30)
    return scores


def loss_scores(
    store: ActivationStore,
    masks: list[torch.Tensor],
    block: int,
    total: int,
    config: Any,
    runner: LayerRunner,
) -> torch.Tensor:
    """For every start l: the model's next-token loss on the held-out batches (every 5th) once the block
    after l is replaced by the map fitted on the other batches. Each later layer is materialised once and
    runs every candidate's held-out states; the model's own norm and head score them."""
    held = [b for b in range(len(masks)) if b % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    fitted = [b for b in range(len(masks)) if b % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    if not held:
        raise CalibrationError(
            f"cut_selection: loss holds out every {HOLDOUT_EVERY}th calibration batch, and there are "
            f"{len(masks)}; use more calibration samples or a smaller calibration.batch_size"
        )
    streams: dict[int, list[torch.Tensor]] = {}
    for start in range(total - block):
        mlp_out, kept_out, target = cut_activations(store, start, start + block)
        equations = NormalEquations(kept_out[0].shape[-1])
        for b in fitted:
            mask = masks[b].to(kept_out[b].device).bool()
            m = mlp_out[b][mask].double()
            equations.add(m, target[b][mask].double() - (kept_out[b][mask].double() - m))
        equations.all_reduce()
        transform, _ = equations.solve(config.ridge)
        streams[start] = [
            (kept_out[b].double() - mlp_out[b].double() + mlp_out[b].double() @ transform).to(
                kept_out[b].dtype
            )
            for b in held
        ]
    for j in range(block + 1, total):  # the layers after each cut, each loaded once
        waiting = [start for start in streams if start + block < j]
        if waiting:
            with runner.editable_layer(j) as layer:
                for start in waiting:
                    streams[start], _ = runner.run_layer(j, streams[start], layer=layer, batches=held)
    scores = torch.zeros(total - block, dtype=torch.float64)
    for start, states in streams.items():
        loss, tokens = runner.language_model_loss(states, held)
        scores[start] = all_reduce_sum(torch.tensor(loss, dtype=torch.float64)) / all_reduce_int(tokens)
    return scores
