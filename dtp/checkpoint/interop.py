"""The key layouts of the DCP checkpoints load_checkpoint reads, found from the checkpoint's own keys.

- dtp and torch TP (`dcp.save({"model": model_sd, "optim": optim_sd})` with get_state_dict): "model.<fqn>",
  "optim.state.<fqn>.<name>", "optim.param_groups.<i>.<hyperparameter>";
- torchtitan: the model's keys at the top ("<fqn>"; under "model." before 2025), the optimizer under "optimizer."
  flattened (flatten_optimizer_state_dict: "param_groups.<fqn>.<hyperparameter>"), beside lr_scheduler /
  dataloader / train_state entries, which are not the model's and are left alone;
- a bare model state dict (`dcp.save(model.state_dict())`), and any other prefix ("app.model.", DCP's tutorial).

The model's prefix is the one under which most of its keys are found; the optimizer's likewise from its state keys.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Layout", "check_keys", "dcp_tree"]


@dataclass
class Layout:
    """Where a checkpoint keeps the model's and the optimizer's keys."""

    model: str  # "model." (dtp, torch TP), "" (torchtitan, a bare state dict), or another prefix
    optim: str | None = None  # "optim." (dtp, torch TP), "optimizer." (torchtitan); None: no optimizer state
    optim_flat: bool = False  # param_groups keyed by parameter name (flatten_optimizer_state_dict=True)


def flat_keys(state: dict) -> set:
    """The dotted keys DCP stores for a nested state dict."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    return set(flatten_state_dict(state)[0])


def first(keys, n: int = 4) -> str:
    """The first n of keys, sorted, and how many more."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _prefix(saved, wanted: set, preferred: tuple) -> str | None:
    """The prefix under which most of `wanted` are in `saved` (preferred ones first on a tie); None if none is."""
    sample = sorted(wanted)[:: max(1, len(wanted) // 16)]
    found = {k[: len(k) - len(w)] for w in sample for k in saved if k.endswith(w)}
    scores = {p: sum(p + w in saved for w in wanted) for p in found if p == "" or p.endswith(".")}
    scores = {p: s for p, s in scores.items() if s}
    if not scores:
        return None
    order = {p: i for i, p in enumerate(preferred)}
    return max(scores, key=lambda p: (scores[p], -order.get(p, len(order)), -len(p)))


def _optim_layout(saved, want: set, params: set) -> tuple[str | None, bool]:
    prefix = _prefix(saved, want, ("optim.", "optimizer.")) if want else None
    if prefix is None:  # another optimizer's state ("<prefix>state.<parameter>.<name>"), or only hyperparameters
        found = {}
        for k in saved:
            i = k.find("state.")
            while i >= 0:
                if (i == 0 or k[i - 1] == ".") and k[i + 6:].rsplit(".", 1)[0] in params:
                    found[k[:i]] = found.get(k[:i], 0) + 1
                i = k.find("state.", i + 1)
        prefix = max(found, key=found.get) if found else next(
            (p for p in ("optim.", "optimizer.") if any(k.startswith(p + "param_groups.") for k in saved)), None)
    if prefix is None:
        return None, False
    nested = prefix + "param_groups.0.params" in saved  # only the nested layout stores each group's names
    return prefix, not nested and any(k.startswith(prefix + "param_groups.") for k in saved)


def _model_keys(saved, prefix: str, mine: set) -> set:
    """The checkpoint's model keys (without the prefix); at the top level, those under the model's own top names."""
    if prefix:
        return {k[len(prefix):] for k in saved if k.startswith(prefix)}
    tops = {k.split(".", 1)[0] for k in mine}
    return {k for k in saved if k.split(".", 1)[0] in tops}


def check_keys(saved: dict, model_sd: dict, optim_sd: dict, with_optimizer: bool, strict: bool):
    """(Layout, checkpoint model keys the model lacks, problems) from the checkpoint's keys and shapes."""
    mine = flat_keys(model_sd)
    prefix = _prefix(saved, mine, ("model.", ""))
    if prefix is None:
        return Layout(""), [], [f"none of the model's keys is in the checkpoint, which holds {first(saved)}"]
    theirs = _model_keys(saved, prefix, mine)
    problems = [f"{k}: not in the checkpoint" for k in sorted(mine - theirs)[:4]]
    for name, value in model_sd.items():
        meta = saved.get(prefix + name)
        if hasattr(value, "shape") and meta is not None and hasattr(meta, "size") \
                and tuple(meta.size) != tuple(value.shape):
            problems.append(f"{name}: checkpoint {tuple(meta.size)} vs model {tuple(value.shape)}")
    extra = sorted(theirs - mine)
    if extra and strict:
        problems.append(f"in the checkpoint but not in the model (strict=False skips them): {first(extra)}")
    layout = Layout(prefix)
    if with_optimizer:
        want = {k for k in flat_keys(optim_sd) if k.startswith("state.")}
        layout.optim, layout.optim_flat = _optim_layout(saved, want, mine | set(extra))
        skipped = set(extra)  # the optimizer state of parameters the model lacks goes with them
        start = (layout.optim or "") + "state."
        have = {k[len(layout.optim or ""):] for k in saved
                if layout.optim is not None and k.startswith(start) and k[len(start):].rsplit(".", 1)[0] not in skipped}
        numbered = have and all(k[6:].split(".", 1)[0].isdigit() and k[6:].rsplit(".", 1)[0] not in mine for k in have)
        if want and (not have or numbered):
            problems.append("the checkpoint holds no optimizer state keyed by parameter name (it was saved without an "
                            "optimizer, or with optimizer.state_dict()'s numbers); load it without one")
        elif want and want != have:
            problems.append(f"the optimizer state differs (another optimizer?): the optimizer wants "
                            f"{first(want - have)}, the checkpoint holds {first(have - want)}")
    return layout, extra, problems


def _put(tree: dict, prefix: str, sub: dict) -> None:
    if not prefix:
        tree.update(sub)
        return
    *path, last = prefix[:-1].split(".")
    for part in path:
        tree = tree.setdefault(part, {})
    tree[last] = sub


def dcp_tree(layout: Layout, state: dict, saved) -> tuple[dict, callable]:
    """(dcp.load's state, keyed as the checkpoint is, sharing state's tensors; a function storing hyperparameters)."""
    # finish() puts the hyperparameters read back into state["optim"]["param_groups"]; each group keeps its names
    tree: dict = {}
    _put(tree, layout.model, state["model"])
    optim = state.get("optim") or {}
    if layout.optim is None or not optim:
        return tree, lambda: None
    box, where = {"state": optim.get("state", {})}, {}
    for i, group in enumerate(optim.get("param_groups", [])):
        for name, value in group.items():
            if name == "params":
                continue
            keys = [f"param_groups.{fqn}.{name}" for fqn in group["params"]] if layout.optim_flat \
                else [f"param_groups.{i}.{name}"]
            key = next((k for k in keys if layout.optim + k in saved), None)
            if key is not None:  # a hyperparameter the checkpoint lacks (saved by another torch) keeps its value
                box[key], where[key] = value, (group, name)
    _put(tree, layout.optim, box)

    def finish() -> None:
        for key, (group, name) in where.items():
            group[name] = box[key]

    return tree, finish
