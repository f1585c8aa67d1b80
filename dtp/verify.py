"""The reference verifier: one model, one batch, one loss, run as single process / DDP / FSDP2 / TP / TP x FSDP2 /
TP x DDP on the ranks at hand; outputs, loss and every parameter's gradient compared by name, gathered to full."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dtp.checkpoint.full import packed_layouts, plain_name, unwrap
from dtp.compose import fully_shard, parallelize_2d
from dtp.mesh import init_mesh
from dtp.plan.parallelize import _matches, parallelize_module
from dtp.replica_check import check_replicas

__all__ = ["verify", "VerifyReport", "MODES"]

MODES = ("ddp", "fsdp", "tp", "tp_fsdp", "tp_ddp")


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


@dataclass
class VerifyReport:
    """Max abs error against single-process per (row, mode); rows are "<output>", "<loss>" and parameter names."""

    modes: tuple
    errors: dict = field(default_factory=dict)  # row -> {mode: relative max abs error}
    failures_by_mode: dict = field(default_factory=dict)  # mode -> exception text
    tolerance: float = 1e-5

    def failures(self) -> list:
        """[(mode, row, error)] for every comparison over tolerance, and (mode, "<raised>", message) for modes that raised."""
        out = [(mode, "<raised>", msg) for mode, msg in self.failures_by_mode.items()]
        for row, per_mode in self.errors.items():
            out += [(m, row, e) for m, e in per_mode.items() if not e <= self.tolerance]
        return out

    @property
    def ok(self) -> bool:
        return not self.failures()

    def assert_ok(self) -> None:
        """AssertionError naming each (mode, parameter) that disagrees with the single process."""
        bad = self.failures()
        if bad:
            lines = [f"  {mode}: {row}: {err if isinstance(err, str) else f'error {err:.3e}'}" for mode, row, err in bad]
            raise AssertionError(f"verify: {len(bad)} mismatch(es) against single-process "
                                 f"(tolerance {self.tolerance:g}):\n" + "\n".join(lines) + f"\n{self}")

    def __str__(self) -> str:
        width = max([len(r) for r in self.errors] + [9])
        head = f"{'':{width}}  " + "  ".join(f"{m:>9}" for m in self.modes)
        lines = [head]
        for row, per_mode in self.errors.items():
            cells = []
            for m in self.modes:
                e = per_mode.get(m)
                cells.append(f"{'raised':>9}" if e is None else f"{e:9.1e}" + ("" if e <= self.tolerance else "!"))
            lines.append(f"{row:{width}}  " + "  ".join(cells))
        for mode, msg in self.failures_by_mode.items():
            lines.append(f"{mode} raised: {msg}")
        lines.append("PASS" if self.ok else "FAIL  (! = over tolerance)")
        return "\n".join(lines)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.shape != expected.shape:
        return math.inf
    if expected.numel() == 0:
        return 0.0
    diff = (actual.detach().double() - expected.detach().double()).abs().max().item()
    return diff / max(1.0, expected.detach().abs().max().item())


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the dp ranks' micro-batch outputs along dim 0."""
    if group is None or dist.get_world_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _build(mode: str, model: nn.Module, plan: dict, tp: int, fsdp_units: Sequence[str]):
    """(wrapped model, dp process group or None) for one mode."""
    world = dist.get_world_size()
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model), dist.group.WORLD
    if mode == "fsdp":
        mesh = init_mesh(dp=world, tp=1)["dp"]
        for name, module in list(model.named_modules()):
            if name and any(_matches(pattern, name) for pattern in fsdp_units):
                fully_shard(module, mesh=mesh)
        return fully_shard(model, mesh=mesh), mesh.get_group()
    if mode == "tp":
        return parallelize_module(model, init_mesh(tp=world), plan), None
    mesh = init_mesh(tp=tp, dp=world // tp)
    data_parallel = "fsdp" if mode == "tp_fsdp" else "ddp"
    units = fsdp_units if data_parallel == "fsdp" else ()
    return parallelize_2d(model, mesh, plan, data_parallel=data_parallel, fsdp_units=units), mesh["dp"].get_group()


def _run(model, inputs, targets, loss_fn, dp_group):
    if dp_group is not None:
        n, me = dist.get_world_size(dp_group), dist.get_rank(dp_group)
        if inputs.shape[0] % n:
            raise ValueError(f"verify: the global batch of {inputs.shape[0]} does not split over {n} data-parallel ranks")
        size = inputs.shape[0] // n
        inputs, targets = inputs[me * size:(me + 1) * size], targets[me * size:(me + 1) * size]
    out = model(inputs)
    loss = loss_fn(out, targets)
    loss.backward()
    out = _gather_rows(_full(out).detach(), dp_group)
    loss = _full(loss).detach()
    if dp_group is not None:  # the mean over the global batch is the mean of the micro-batch means
        loss = loss.clone()
        dist.all_reduce(loss, group=dp_group)
        loss /= dist.get_world_size(dp_group)
    layouts = packed_layouts(model)  # packed q/k/v, gate/up: compared in their original layout
    grads = {}
    for n, p in unwrap(model).named_parameters():
        grad = _full(p.grad) if p.grad is not None else torch.zeros(p.shape)
        grads[plain_name(n)] = layouts[plain_name(n)].unpack(grad) if plain_name(n) in layouts else grad
    return out, loss, grads


def verify(model_fn: Callable[[], nn.Module], plan: dict, inputs: torch.Tensor, targets: torch.Tensor,
           loss_fn: Callable, *, modes: Sequence[str] = MODES, tp: int = 2, fsdp_units: Sequence[str] = (),
           seed: int = 0, tolerance: float = 1e-5) -> VerifyReport:
    """Run model_fn() (seeded) as single process and as each mode on the same global batch; compare outputs, loss and grads.

    loss_fn(output, targets) must average over the batch (so data-parallel ranks agree with one process);
    every rank must pass the same inputs and targets.  A mode that raises is reported, not propagated.
    """
    world = dist.get_world_size()
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"verify: unknown modes {sorted(unknown)}; choose from {MODES}")
    if any(m.startswith("tp_") for m in modes) and world % tp:
        raise ValueError(f"verify: the 2-D modes need tp={tp} to divide the world size {world}")
    torch.manual_seed(seed)
    reference = model_fn()
    ref_out, ref_loss, ref_grads = _run(reference, inputs, targets, loss_fn, None)
    report = VerifyReport(tuple(modes), tolerance=tolerance)
    rows = {"<output>": {}, "<loss>": {}, **{name: {} for name in ref_grads}}
    for mode in modes:
        torch.manual_seed(seed)
        try:
            model, dp_group = _build(mode, model_fn(), plan, tp, fsdp_units)
            check_replicas(unwrap(model))  # replicated copies that differ between ranks are reported, not averaged
            out, loss, grads = _run(model, inputs, targets, loss_fn, dp_group)
        except Exception as exc:  # every rank raises alike (same model, same plan), so none is left waiting
            report.failures_by_mode[mode] = f"{type(exc).__name__}: {exc}"
            continue
        rows["<output>"][mode] = _rel_err(out, ref_out)
        rows["<loss>"][mode] = _rel_err(loss, ref_loss)
        for name, ref in ref_grads.items():
            rows[name][mode] = _rel_err(grads[name], ref) if name in grads else math.inf
    report.errors = rows
    return report
