"""The Hugging Face zoo: every causal-LM type of the installed transformers that carries a tp_plan, from a tiny
config, through its own plan, against one process (logits, loss, every gradient).

    python -m zoo.hf_zoo                 # every type at tp 2, on dtp and on transformers' own TP
    python -m zoo.hf_zoo --tp 4 llama mixtral deepseek_v2
    python -m zoo.hf_zoo --library dtp   # dtp only

Each result is one of: passed; refused (dtp said no at plan time, with the reason); plan at fault (dtp found a
mistake in the model's own plan, with the reason); failed (an error or a number that differs: a bug to fix).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from zoo.tiny_configs import causal_lm_types, tiny_config

TOLERANCE = 1e-3  # relative to the reference's largest magnitude (float32; recurrences reorder long sums)


def _differs(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        return float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _parallelize(model, library: str) -> None:
    import dtp

    if library == "dtp":
        dtp.parallelize_module(model, dtp.default_mesh(), model.tp_plan)
    else:
        from transformers.distributed.tensor_parallel import apply_tensor_parallelism

        if getattr(model, "_mesh_manager", False) is None:  # from_pretrained's meshes (unit_colwise reads them)
            from transformers.distributed.utils import TransformersDeviceMesh

            model._mesh_manager = TransformersDeviceMesh(dtp.default_mesh(), dtp.default_mesh())
        apply_tensor_parallelism(model, dtp.default_mesh(), model._expand_parallel_plan(model.tp_plan))  # as from_pretrained


def zoo_case(model_type: str, library: str = "dtp") -> dict:
    """One model type through its own plan on this rank's default process group, against one process."""
    import transformers

    import dtp
    from dtp.plan.mistakes import PlanMistake

    config_class, class_name = next((c, n) for t, c, n in causal_lm_types() if t == model_type)
    try:
        torch.manual_seed(0)
        config = tiny_config(config_class)
        single = getattr(transformers, class_name)(config).eval()
    except Exception as e:  # noqa: BLE001 - a config this script cannot shrink is reported, not fatal
        return {"status": "no tiny config", "reason": f"{type(e).__name__}: {e}"[:160]}
    model = copy.deepcopy(single)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _parallelize(model, library)
        except PlanMistake as e:
            return {"status": "plan at fault", "reason": str(e)[:400]}
        except (ValueError, TypeError, NotImplementedError, KeyError) as e:
            return {"status": "refused", "reason": f"{type(e).__name__}: {e}"[:200]}
    mistakes = [str(w.message) for w in caught if issubclass(w.category, PlanMistake)]
    if mistakes:
        return {"status": "plan at fault", "reason": mistakes[0][:200]}
    packed = dtp.packed_layouts(model) if library == "dtp" else {}
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    try:
        out, ref = model(input_ids=ids, labels=ids), single(input_ids=ids, labels=ids)
        out.loss.backward()
        ref.loss.backward()
    except PlanMistake as e:
        return {"status": "plan at fault", "reason": str(e)[:400]}
    except Exception as e:  # noqa: BLE001
        try:  # a tiny config the model itself cannot run in one process is this script's problem, not a TP one
            single.zero_grad()
            single(input_ids=ids, labels=ids).loss.backward()
        except Exception as alone:  # noqa: BLE001
            return {"status": "no tiny config", "reason": f"one process fails too: {type(alone).__name__}: {alone}"[:200]}
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:200]}
    worst = [("logits", _differs(_full(out.logits), ref.logits)), ("loss", _differs(_full(out.loss), ref.loss))]
    for (name, p), r in zip(model.named_parameters(), single.parameters()):
        if r.grad is None and p.grad is None:
            continue
        if p.grad is None or r.grad is None:
            worst.append((f"grad of {name}", float("inf")))
            continue
        grad = _full(p.grad)
        worst.append((f"grad of {name}", _differs(packed[name].unpack(grad) if name in packed else grad, r.grad)))
    what, diff = max(worst, key=lambda w: w[1])
    if diff > TOLERANCE:
        return {"status": "failed", "reason": f"{what} differs by {diff:.2g} (relative)"}
    return {"status": "passed", "reason": f"worst: {what} {diff:.1g}"}


def run_zoo(types, tp: int, libraries=("dtp", "transformers"), timeout: float = 240.0) -> dict:
    """{(model_type, library): result} with every case on one pool of tp gloo ranks (restarted after a crash)."""
    from dtp.testing import RankPool, RankError

    results = {}
    pool = RankPool(tp, timeout=timeout)
    try:
        for model_type in types:
            for library in libraries:
                t0 = time.perf_counter()
                try:
                    result = pool.run(zoo_case, model_type, library)[0]
                except RankError as e:
                    result = {"status": "failed", "reason": "ranks disagreed or crashed: " + str(e).splitlines()[-1][:160]}
                result["seconds"] = time.perf_counter() - t0
                results[model_type, library] = result
                print(f"{model_type:28s} {library:12s} {result['status']:14s} {result['reason'][:110]}", flush=True)
    finally:
        pool.close()
    return results


def format_table(results: dict, tp: int, libraries) -> str:
    """A markdown table: one row per model type, one column per library."""
    types = sorted({t for t, _ in results})
    lines = [f"| model type (tp {tp}) | " + " | ".join(libraries) + " |", "|---" * (len(libraries) + 1) + "|"]
    for t in types:
        cells = []
        for lib in libraries:
            r = results.get((t, lib))
            cells.append("" if r is None else r["status"] if r["status"] == "passed" else f"{r['status']}: {r['reason']}")
        lines.append(f"| {t} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("types", nargs="*", help="model types (default: every causal-LM type with a tp_plan)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--library", choices=("dtp", "transformers", "both"), default="both")
    args = parser.parse_args(argv)
    import transformers

    types = args.types or [t for t, _, _ in causal_lm_types()]
    libraries = ("dtp", "transformers") if args.library == "both" else (args.library,)
    results = run_zoo(types, args.tp, libraries)
    print(f"\ntransformers {transformers.__version__}, torch {torch.__version__}, tp {args.tp}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print(format_table(results, args.tp, libraries))
    for lib in libraries:
        counts = {}
        for (t, l), r in results.items():
            if l == lib:
                counts[r["status"]] = counts.get(r["status"], 0) + 1
        print(f"{lib}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
