"""The benchmark's tables: one row per shape and world size from bench_rank's medians, as Markdown."""

from __future__ import annotations

__all__ = ["table_row", "format_table", "format_compiled_table"]


def table_row(shape: str, world: int, backend: str, r: dict) -> dict:
    med = r["median"]
    hand = med.get("hand")
    return {"shape": shape, "world_size": world, "backend": backend, **{f"{k}_ms": round(v, 3) for k, v in med.items()},
            **{f"{k}_spread_ms": [round(a, 3), round(b, 3)] for k, (a, b) in r["spread"].items()},
            "dtp_over_torch": round(med["dtp"] / med["torch"], 3),
            "dtp_over_hand": round(med["dtp"] / hand, 3) if hand else None,
            "speedup_vs_single": round(med["single"] / med["dtp"], 3),
            **{f"plan_{k}_ms": round(v, 1) for k, v in r["plan_ms"].items()},
            **({"compiled_dtp_over_torch": round(med["dtp_compiled"] / med["torch_compiled"], 3),
                "compiled_over_eager_dtp": round(med["dtp_compiled"] / med["dtp"], 3)} if "dtp_compiled" in med else {}),
            "dtp_param_mib_per_rank": round(r["param_mib"]["dtp"], 3),
            "single_param_mib": round(r["param_mib"]["single"], 3), "peak_mib_per_rank": round(r["peak_mib"], 1)}


def format_table(rows) -> str:
    head = ("| shape | ws | dtp ms | torch ms | hand ms | single ms | dtp/torch | dtp/hand | speed-up vs 1 | "
            "plan ms dtp (src=None) / torch | params MiB/rank (1 proc) | peak MiB/rank |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        hand = f"{r['hand_ms']:.3f}" if r.get("hand_ms") else "-"
        ratio = f"{r['dtp_over_hand']:.2f}" if r["dtp_over_hand"] else "-"
        lines.append(f"| {r['shape']} | {r['world_size']} | {r['dtp_ms']:.3f} | {r['torch_ms']:.3f} | {hand} | "
                     f"{r['single_ms']:.3f} | {r['dtp_over_torch']:.2f} | {ratio} | {r['speedup_vs_single']:.2f}x | "
                     f"{r['plan_dtp_ms']:.1f} ({r['plan_dtp_local_ms']:.1f}) / {r['plan_torch_ms']:.1f} | "
                     f"{r['dtp_param_mib_per_rank']:.2f} ({r['single_param_mib']:.2f}) | {r['peak_mib_per_rank']:.0f} |")
    return "\n".join(lines)


def format_compiled_table(rows) -> str:
    lines = ["| shape | ws | dtp eager ms | dtp compiled ms | torch compiled ms | torch eager ms | compiled dtp/torch | "
             "dtp compiled/eager | compile s dtp / torch |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['world_size']} | {r['dtp_ms']:.3f} | {r['dtp_compiled_ms']:.3f} | "
                     f"{r['torch_compiled_ms']:.3f} | {r['torch_ms']:.3f} | {r['compiled_dtp_over_torch']:.2f} | "
                     f"{r['compiled_over_eager_dtp']:.2f} | {r['plan_dtp_compiled_ms'] / 1e3:.1f} / "
                     f"{r['plan_torch_compiled_ms'] / 1e3:.1f} |")
    return "\n".join(lines)
