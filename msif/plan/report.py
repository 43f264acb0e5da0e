"""The plan as a text table."""

from __future__ import annotations


def fmt_bytes(n: float) -> str:
    for unit, k in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_s(t: float) -> str:
    if t >= 3600:
        return f"{t / 3600:.1f} h"
    if t >= 60:
        return f"{t / 60:.1f} min"
    return f"{t:.1f} s"


def format_plan(p: dict) -> str:
    """The plan as a text table: one row per stage, then each stage's memory components."""
    sh = p["shape"]
    lines = [
        f"model {p['model']}: {sh['model_type']}, {sh['n_params'] / 1e6:.1f}M parameters ({sh['dtype']}), "
        f"{sh['tracked_modules']} tracked layers in {sh['blocks']} blocks, P = {sh['tracked_params'] / 1e6:.1f}M tracked",
        f"corpus: {p['settings']['documents']} documents × {p['settings']['tokens']} tokens (batches padded to {p['seq_len']}); "
        f"{p['settings']['queries']} queries; factors {fmt_bytes(p['factor_bytes'])} per stage on disk, "
        f"{fmt_bytes(p['scoring_factor_bytes'])} loaded for scoring",
        "",
        f"{'stage':<14} {'peak memory':>12} {'weights':>10} {'factors':>10} {'activations':>12} {'query vec.':>11} "
        f"{'TFLOP':>9} {'passes':>6} {'time':>9}",
    ]
    for st in p["stages"]:
        m = st["memory"]
        act = sum(v for k, v in m.items() if k in ("activations", "logits", "layer inputs a", "per-example work", "candidate grads s"))
        lines.append(f"{st['name']:<14} {fmt_bytes(st['peak_bytes']):>12} {fmt_bytes(m.get('weights', 0)):>10} "
                     f"{fmt_bytes(m.get('factors', 0) + m.get('rotation cache', 0)):>10} {fmt_bytes(act):>12} "
                     f"{fmt_bytes(m.get('query vectors', 0)):>11} {st['flops'] / 1e12:>9.2f} {st['passes']:>6} {_fmt_s(st['time_s']):>9}")
    tp = p["throughput_flops"]
    lines += ["", f"time at {tp['fit'] / 1e9:.0f} GFLOP/s ({'measured' if tp['calibrated'] else 'nominal; --calibrate measures it'}); "
              f"a plain training pass over the pt fit data: {_fmt_s(p['train_pass_s'])}", ""]
    for st in p["stages"]:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in st["memory"].items() if v)
        lines.append(f"{st['name']}: {parts}" + (f"; {st['note']}" if st["note"] else ""))
    r = p["recommend"]
    if "warning" in r:  # a batch size of 0 or a rank of 0 is no recommendation
        lines += ["", f"for {fmt_bytes(p['device_memory'])} of device memory: " + r["warning"]]
    else:
        lines += ["", f"for {fmt_bytes(p['device_memory'])} of device memory: fit --batch-size {r['fit_batch_size']}, "
                  f"attribute --batch-size {r['score_batch_size']}, "
                  + (f"--rank {r['rank']}" if r["rank"] else "dense query vectors (no --rank needed)")]
    return "\n".join(lines)
