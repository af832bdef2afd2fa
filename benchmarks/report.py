"""Turn the runner's results (results.json) into results.md and speedup.png.

    python -m benchmarks.report [benchmarks/results/results.json]   # regenerate md + png

GFLOP/s = FLOPs (BENCHMARKS.md's count) / median time; "frac" = that / the float32 matmul rate
(numpy 2048^3) measured in the same process; speedup = keras time / fastconv time, both measured
interleaved in one process. Cross-backend comparisons ("fastest Keras backend") compare times of
the same invocation.
"""

import json
import math
import os
import statistics
import sys
import time

BACKENDS = ("tensorflow", "jax", "torch", "numpy")
DIRECTIONS = ("fwd", "train")
TRAIN_BACKENDS = ("tensorflow", "jax", "torch")
COLORS = {"tensorflow": "tab:orange", "jax": "tab:blue", "torch": "tab:red", "numpy": "tab:green"}


# ---------------------------------------------------------------------------------------------
# Access helpers

def _first_call_summary(results, backends):
    """' Those untimed first calls took ...': the median over cases of first / timed median,
    per library (fastconv on all threads, keras), over both directions; '' for older results."""
    ratios = {"fastconv": [], "keras": []}
    for b in backends:
        for r in results["runs"].get(b, {}).get("cases", {}).values():
            for d in DIRECTIONS:
                for v, out in ratios.items():
                    timing = (r.get(d) or {}).get(v) or {}
                    if timing.get("first"):
                        out.append(statistics.median(timing["first"]) / timing["median"])
    if not ratios["fastconv"]:
        return ""
    parts = [f"{v} {statistics.median(x):.2f}× (max {max(x):.2f}×)" for v, x in ratios.items()
             if x]
    return (" The first of those untimed calls took, over the (case, direction, backend) "
            "timings, a median of: " + ", ".join(parts) + " the timed median.")


def _canary_summary(results, backends):
    """' A round during which ...': the rounds timed again because a CPU went missing
    (benchmarks/worker.py, Canary); '' for older results."""
    timings = dropped = rounds = capped = 0
    limits = set()
    for b in backends:
        for r in results["runs"].get(b, {}).get("cases", {}).values():
            for d in DIRECTIONS:
                timing = next(iter((r.get(d) or {}).values()), {})
                if "dropped" not in timing:
                    continue
                timings += 1
                dropped += timing["dropped"]
                # older results: a reading before the first round and one after each
                n = timing.get("rounds_timed", len(timing["canary"]) - 1)
                rounds += n
                capped += timing["dropped"] >= timing.get("max_dropped", n - timing["dropped"])
                limits.add(timing.get("disturbed", 1.5))
    if not timings:
        return ""
    limit = "/".join(f"{x:g}" for x in sorted(limits))
    return (" Before and after each round a canary (two threads, the same fixed work each) "
            "checked that both CPUs were there (on these shared machines one goes missing for "
            "10 ms to seconds at a time: 2-thread calls then run at 1-thread speed, whatever "
            f"the library); a round with the canary over {limit}× its best time was timed again: "
            f"{dropped} of {rounds} rounds over {timings} (case, direction, backend) timings"
            + (f", {capped} of them still at the limit of retries" if capped else "")
            + ".")


def _rec(results, case, backend):
    return results["runs"].get(backend, {}).get("cases", {}).get(case)


def seconds(results, case, backend, direction, variant):
    r = _rec(results, case, backend)
    try:
        return r[direction][variant]["median"]
    except (KeyError, TypeError):
        return None


def gflops(results, case, backend, direction, variant):
    t = seconds(results, case, backend, direction, variant)
    if t is None:
        return None
    r = _rec(results, case, backend)
    return r["flops_" + direction] / t / 1e9


def frac(results, case, backend, direction, variant="fastconv"):
    g = gflops(results, case, backend, direction, variant)
    r = _rec(results, case, backend)
    if g is None or not r.get("matmul_gflops"):
        return None
    return g / r["matmul_gflops"]


def speedup(results, case, backend, direction):
    k = seconds(results, case, backend, direction, "keras")
    f = seconds(results, case, backend, direction, "fastconv")
    return k / f if k and f else None


def thread_scaling(results, case, backend, direction):
    one = seconds(results, case, backend, direction, "fastconv_1t")
    many = seconds(results, case, backend, direction, "fastconv")
    return one / many if one and many else None


def fastest_keras(results, case, direction):
    """(backend, GFLOP/s) of the fastest Keras backend for this case in this run."""
    best = None
    for b in BACKENDS:
        g = gflops(results, case, b, direction, "keras")
        if g is not None and (best is None or g > best[1]):
            best = (b, g)
    return best


def geomean(values):
    values = [v for v in values if v]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def backends_run(results):
    return [b for b in BACKENDS if b in results["runs"]]


def case_names(results, public=None, small=None, pred=None):
    out = []
    for name, c in results["cases"].items():
        if public is not None and c["public"] != public:
            continue
        if small is not None and c["small"] != small:
            continue
        if pred is not None and not pred(c):
            continue
        out.append(name)
    return out


def _errors(r):
    if r is None:
        return []
    errs = [r.get("err_fwd")] + list((r.get("err_train") or {}).values())
    return [e for e in errs if e is not None]


def _f(v, fmt="{:.1f}", none="–"):
    return none if v is None else fmt.format(v)


# ---------------------------------------------------------------------------------------------
# Targets (BENCHMARKS.md)

def _verdict(ok):
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def check_targets(results):
    """[(target, ok or None, numbers)] for each of BENCHMARKS.md's targets."""
    rows = []
    backends = backends_run(results)
    public = case_names(results, public=True)
    public_large = [c for c in public if not results["cases"][c]["small"]]

    def dirs_for(b):
        return DIRECTIONS if b in TRAIN_BACKENDS else ("fwd",)

    # 1. Every case at least as fast as the fastest Keras backend, forward and train.
    fails, total, best_ok, best_total = [], 0, 0, 0
    for c in public:
        for d in DIRECTIONS:
            fk = fastest_keras(results, c, d)
            if fk is None:
                continue
            best_fc = None
            for b in backends:
                g = gflops(results, c, b, d, "fastconv")
                if g is None:
                    continue
                total += 1
                best_fc = g if best_fc is None else max(best_fc, g)
                if g < fk[1]:
                    fails.append(f"{c} {d} {b}: {g:.1f} < {fk[1]:.1f} ({fk[0]})")
            if best_fc is not None:
                best_total += 1
                best_ok += best_fc >= fk[1]
    rows.append((
        "Every public case, fwd and train: fastconv (on each backend) ≥ the fastest Keras backend",
        (not fails) if total else None,
        f"{total - len(fails)}/{total} (case, direction, backend) met; on fastconv's best backend "
        f"{best_ok}/{best_total} (case, direction) met"
        + (f". Not met: {'; '.join(fails[:12])}" + (" …" if len(fails) > 12 else "") if fails
           else "")))

    # 2. Geometric mean >= 1.5x over the cases (against the fastest Keras backend).
    parts, ok = [], True
    for b in backends:
        for d in dirs_for(b):
            ratios = []
            for c in public:
                fk = fastest_keras(results, c, d)
                g = gflops(results, c, b, d, "fastconv")
                if fk and g:
                    ratios.append(g / fk[1])
            gm = geomean(ratios)
            if gm is not None:
                ok &= gm >= 1.5
                parts.append(f"{b} {d} {gm:.2f}×")
    rows.append(("Geometric mean over the public cases ≥ 1.5× the fastest Keras backend",
                 ok if parts else None, ", ".join(parts)))

    # 3. Dense cases >= 0.6 of the matmul rate, forward and gradients.
    dense = [c for c in public_large if results["cases"][c]["groups"] == 1]
    parts, ok, any_ = [], True, False
    for b in backends:
        for d in dirs_for(b):
            fr = [(frac(results, c, b, d), c) for c in dense]
            fr = [x for x in fr if x[0] is not None]
            if not fr:
                continue
            any_ = True
            low = min(fr)
            n_ok = sum(v >= 0.6 for v, _ in fr)
            ok &= n_ok == len(fr)
            parts.append(f"{b} {d}: {n_ok}/{len(fr)}, min {low[0]:.2f} ({low[1]})")
    rows.append(("Dense public cases ≥ 0.6 of the matmul rate, fwd and train",
                 ok if any_ else None, "; ".join(parts)))

    # 4. grouped32 >= 0.35 of the matmul rate.
    parts, ok, any_ = [], True, False
    for b in backends:
        for d in dirs_for(b):
            v = frac(results, "grouped32", b, d)
            if v is not None:
                any_ = True
                ok &= v >= 0.35
                parts.append(f"{b} {d} {v:.2f}")
    rows.append(("grouped32 (8 channels per group) ≥ 0.35 of the matmul rate",
                 ok if any_ else None, ", ".join(parts)))

    # 5. Grouped and depthwise training step vs Keras on the same backend.
    need = {"tensorflow": (10, 10), "jax": (10, 10), "torch": (1.5, 3)}
    parts, ok, any_ = [], True, False
    for c in ("grouped32", "grouped8", "depthwise"):
        for b in backends:
            if b not in need:
                continue
            s = speedup(results, c, b, "train")
            if s is None:
                continue
            any_ = True
            want = need[b][1] if results["cases"].get(c, {}).get("kind") == "depthwise" \
                else need[b][0]
            ok &= s >= want
            parts.append(f"{c} {b} {s:.1f}× (≥{want:g})")
    rows.append(("Grouped/depthwise train step: ≥ 10× Keras on TF and JAX, ≥ 1.5× (grouped) / "
                 "≥ 3× (depthwise) on torch", ok if any_ else None, ", ".join(parts)))

    # 6. Depthwise forward >= 0.25 of the matmul rate, faster than torch's own depthwise kernel.
    parts, ok, any_ = [], True, False
    for b in backends:
        v = frac(results, "depthwise", b, "fwd")
        if v is not None:
            any_ = True
            ok &= v >= 0.25
            parts.append(f"{b} {v:.2f}")
    td = gflops(results, "depthwise", "torch", "fwd", "torch_direct")
    fc = gflops(results, "depthwise", "torch", "fwd", "fastconv")
    if td and fc:
        ok &= fc > td
        parts.append(f"torch backend: fastconv {fc:.1f} vs torch F.conv2d {td:.1f} GFLOP/s")
    caps = []
    for b in backends:
        # the memory bound: its input read and its output written at the copy rate measured in
        # the same process
        r = _rec(results, "depthwise", b)
        if r and r.get("copy_gbps") and r.get("matmul_gflops"):
            moved = r["input_bytes"] + r["output_bytes"]
            cap = r["flops_fwd"] * r["copy_gbps"] / moved
            caps.append(f"{b} {cap:.0f} GFLOP/s = {cap / r['matmul_gflops']:.2f} "
                        f"({r['copy_gbps']:.0f} GB/s)")
    if caps:
        parts.append("memory bound (input read and output written at the rate of a plain copy "
                     "on the same threads, measured in each process, warm): " + ", ".join(caps))
    rows.append(("Depthwise fwd ≥ 0.25 of the matmul rate and faster than torch's F.conv2d",
                 ok if any_ else None, "; ".join(parts)))

    # 7. Dilation costs nothing: dilated2/4 within 10% of resnet3x3's GFLOP/s.
    parts, ok, any_ = [], True, False
    for b in backends:
        for d in dirs_for(b):
            base = gflops(results, "resnet3x3", b, d, "fastconv")
            for c in ("dilated2", "dilated4"):
                g = gflops(results, c, b, d, "fastconv")
                if base and g:
                    any_ = True
                    ok &= g / base >= 0.9
                    parts.append(f"{c} {b} {d} {g / base:.2f}")
    rows.append(("dilated2/dilated4 within 10% of resnet3x3's GFLOP/s (ratio ≥ 0.90)",
                 ok if any_ else None, ", ".join(parts)))

    # 7b. The form: dilation costs < 10% over the undilated case, against the same
    # layer with dilation 1 timed in the same interleaved rounds (fastconv_undilated).
    parts, ok, any_ = [], True, False
    for c in case_names(results, pred=lambda c: c.get("dilation", 1) != 1):
        for b in backends:
            for d in dirs_for(b):
                t_dil = seconds(results, c, b, d, "fastconv")
                t_und = seconds(results, c, b, d, "fastconv_undilated")
                if t_dil and t_und:
                    any_ = True
                    ok &= t_und / t_dil >= 0.9
                    parts.append(f"{c} {b} {d} {t_und / t_dil:.2f}")
    rows.append(("Dilation costs < 10% over the undilated case: GFLOP/s over those of the same "
                 "layer with dilation 1, timed interleaved (ratio ≥ 0.90)",
                 ok if any_ else None, ", ".join(parts)))

    # 8. channels_first within 1.3x the time of channels_last: against the channels_last twin
    # timed interleaved in the same process (fastconv_cl), else the channels_last case.
    parts, ok, any_ = [], True, False
    for cf in case_names(results, pred=lambda c: c["data_format"] == "channels_first"):
        cl = cf[:-3] if cf.endswith("_cf") else None
        for b in backends:
            for d in dirs_for(b):
                t_cf = seconds(results, cf, b, d, "fastconv")
                t_cl = seconds(results, cf, b, d, "fastconv_cl")
                if t_cl is None and cl:
                    t_cl = seconds(results, cl, b, d, "fastconv")
                if t_cf and t_cl:
                    any_ = True
                    ok &= t_cf / t_cl <= 1.3
                    parts.append(f"{cf} {b} {d} {t_cf / t_cl:.2f}")
    rows.append(("channels_first within 1.3× the time of channels_last (ratio ≤ 1.30)",
                 ok if any_ else None, ", ".join(parts)))

    # 9. Two threads >= 1.8x one thread on the dense cases.
    parts, ok, any_ = [], True, False
    for b in backends:
        for d in dirs_for(b):
            sc = [(thread_scaling(results, c, b, d), c) for c in dense]
            sc = [x for x in sc if x[0] is not None]
            if not sc:
                continue
            any_ = True
            n_ok = sum(v >= 1.8 for v, _ in sc)
            ok &= n_ok == len(sc)
            low = min(sc)
            parts.append(f"{b} {d}: {n_ok}/{len(sc)}, min {low[0]:.2f} ({low[1]})")
    rows.append(("Two threads ≥ 1.8× one thread on the dense public cases",
                 ok if any_ else None, "; ".join(parts)))

    # 10. No extra memory proportional to KH*KW*input (no full im2col buffer). Checked where an
    # im2col buffer would dwarf the call's own arrays (>= 2x input + output) and the noise of
    # the measurement (>= 8 MiB), so that a peak below its size shows it was never allocated.
    worst, ok, any_, checked = None, True, False, set()
    for c, cd in results["cases"].items():
        if cd["k"] == 1 or cd["small"]:
            continue
        for b in backends:
            m = results["runs"][b].get("memory", {}).get(c)
            if not m or m["im2col_bytes"] < max(2 * (m["input_bytes"] + m["output_bytes"]),
                                                8 * 2**20):
                continue
            checked.add(c)
            for d in DIRECTIONS:
                v = (m.get(d) or {}).get("fastconv")
                if v is None:
                    continue
                any_ = True
                r = v / m["im2col_bytes"]
                ok &= r < 1
                if worst is None or r > worst[0]:
                    worst = (r, c, b, d, v)
    rows.append(("No full im2col buffer: fastconv's peak extra memory (fwd and train) < the "
                 "im2col size, on the cases where that is ≥ 2× input + output and ≥ 8 MiB",
                 ok if any_ else None,
                 f"{len(checked)} cases ({', '.join(sorted(checked))}); worst: {worst[1]} {worst[2]} "
                 f"{worst[3]} {worst[4] / 2**20:.1f} MiB = {worst[0]:.2f} of im2col"
                 if worst else ""))
    return rows


# ---------------------------------------------------------------------------------------------
# Markdown

def markdown(results):
    meta = results["meta"]
    backends = backends_run(results)
    L = []
    L.append("# fastconv layer benchmarks: `keras.layers.Conv2D` vs `fastconv.Conv2D`")
    L.append("")
    L.append(f"Run {meta['started']} ({meta['duration_s'] / 60:.1f} min), `{meta['command']}`, "
             f"git {meta.get('git_commit') or '?'}"
             f"{' (fastconv sources modified)' if meta.get('git_dirty') else ''}"
             f". Machine: {meta.get('cpu')}, {meta.get('cpus')} CPUs; load average at start "
             f"{meta.get('loadavg_start')}, at end {meta.get('loadavg_end')}"
             + (" — **the machine was busy: absolute numbers are low and noisy; ratios measured "
                "in one process are the result**" if meta.get("busy") else "") + ".")
    L.append("")
    L.append(f"Each backend ran in its own process; median of ≥ {meta['reps']} interleaved calls "
             f"after {meta['warmup']} warm-up calls (calls slower than {meta['time_cap']:g} s / "
             f"{meta['reps']} got fewer rounds, ≥ 3). fwd = eager `layer(x)`; train = the forward and "
             "its gradients wrt input, kernel and bias for an output gradient dy (those of "
             "sum(layer(x)·dy)) with the backend's autodiff (tf.GradientTape eager with "
             "output_gradients, jax.jit(jax.vjp) over `stateless_call`, torch.autograd.grad "
             "with grad_outputs). GFLOP/s with BENCHMARKS.md's FLOPs (train = 3× fwd); "
             "frac = fastconv's GFLOP/s / the float32 matmul rate (numpy 2048³) measured in the "
             "same process; speedup = keras time / fastconv time in the same process; "
             "2T vs 1T = fastconv's time on 1 thread / on all threads (2 here). "
             "channels_first cases also time fastconv on their channels_last twin (same "
             "weights, transposed data) in the same interleaved rounds; the channels_first "
             "target is that ratio; so do dilated cases on their undilated twin (the same "
             "layer with dilation 1). In each round a variant faster than 0.5 s first ran "
             "untimed for 20 ms (at least once), so that the timed calls run as in a training "
             "loop: calls right after another variant run slower on this machine, whatever the "
             "library (cold caches, idle cores)." + _first_call_summary(results, backends)
             + _canary_summary(results, backends))
    L.append("")

    L.append("## Summary")
    L.append("")
    L.append("Geometric-mean speedup fastconv / keras on the same backend:")
    L.append("")
    L.append("| backend | fwd, public cases | train, public cases | fwd, all cases | "
             "train, all cases |")
    L.append("|---|---|---|---|---|")
    public = case_names(results, public=True)
    every = case_names(results)
    for b in backends:
        cells = []
        for names in (public, every):
            for d in DIRECTIONS:
                cells.append(_f(geomean([speedup(results, c, b, d) for c in names]), "{:.2f}×"))
        L.append(f"| {b} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    L.append("")

    bad = []
    for c in results["cases"]:
        for b in backends:
            r = _rec(results, c, b)
            if r is None:
                continue
            errs = {"fwd": r.get("err_fwd"), **(r.get("err_train") or {})}
            bad += [f"{c} {b} {k} {v:.1e}" for k, v in errs.items() if v is not None and v > 1e-3]
    if bad:
        L.append("**WRONG RESULTS: fastconv differs from keras by more than 1e-3 (relative to the "
                 "largest value) in: " + ", ".join(bad) + ".**")
    else:
        worst = max((e for c in results["cases"] for b in backends
                     for e in _errors(_rec(results, c, b))), default=None)
        L.append(f"Correctness: fastconv and keras agree everywhere (outputs and gradients; "
                 f"largest relative difference {_f(worst, '{:.1e}')}).")
    kernels = {(p["env"].get("fastconv_kernels_file"), p["env"].get("fastconv_kernels_mtime"))
               for b in backends for p in results["runs"][b]["processes"] if p.get("env")}
    if len(kernels) > 1:
        L.append("")
        L.append("**The kernel binaries were rebuilt during this run: processes loaded different "
                 "builds (" + ", ".join(f"{f} of {time.strftime('%H:%M:%S', time.localtime(t))}"
                                       for f, t in sorted(kernels, key=str)) + ").**")
    L.append("")

    L.append("## BENCHMARKS.md targets")
    L.append("")
    L.append("| target | verdict | numbers |")
    L.append("|---|---|---|")
    for target, ok, numbers in check_targets(results):
        L.append(f"| {target} | {_verdict(ok)} | {numbers} |")
    L.append("")

    L.append("## Per case (GFLOP/s)")
    L.append("")
    L.append("| case | backend | keras fwd | fastconv fwd | speedup | frac | keras train | "
             "fastconv train | speedup | frac | 2T vs 1T fwd | 2T vs 1T train | max rel err |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c, cd in results["cases"].items():
        for b in backends:
            r = _rec(results, c, b)
            if r is None:
                err = results["runs"][b].get("errors", {}).get(c)
                if err:
                    L.append(f"| {c} | {b} | error: {err} |" + " |" * 10)
                continue
            errs = _errors(r)
            cells = [c, b]
            for d in DIRECTIONS:
                cells += [_f(gflops(results, c, b, d, "keras"), "{:.3g}"),
                          _f(gflops(results, c, b, d, "fastconv"), "{:.3g}"),
                          _f(speedup(results, c, b, d), "{:.2f}×"),
                          _f(frac(results, c, b, d), "{:.2f}")]
            cells += [_f(thread_scaling(results, c, b, d), "{:.2f}") for d in DIRECTIONS]
            cells.append(_f(max(errs) if errs else None, "{:.1e}"))
            L.append("| " + " | ".join(cells) + " |")
    L.append("")
    if "torch" in backends:
        L.append("torch's own `F.conv2d` on NCHW tensors (what a torch user gets), forward "
                 "GFLOP/s, in the torch process: " + ", ".join(
                     f"{c} {gflops(results, c, 'torch', 'fwd', 'torch_direct'):.1f}"
                     for c in results["cases"]
                     if gflops(results, c, "torch", "fwd", "torch_direct")) + ".")
        L.append("")

    small = case_names(results, small=True)
    if small:
        L.append("## Small layers: time per call (µs)")
        L.append("")
        L.append("host = fastconv's kernel called on numpy arrays (`fastconv.backends.numpy."
                 "forward`); bridge = fastconv layer − host: what the layer and the backend "
                 "bridge add per call.")
        L.append("")
        L.append("| case | backend | keras fwd | fastconv fwd | fastconv fwd 1T | host | "
                 "bridge | keras train | fastconv train | fastconv train 1T |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for c in small:
            for b in backends:
                if _rec(results, c, b) is None:
                    continue

                def us(d, v):
                    return seconds(results, c, b, d, v)
                f, h = us("fwd", "fastconv"), us("fwd", "host")
                cells = [c, b] + [_f(us("fwd", v) and us("fwd", v) * 1e6, "{:.0f}")
                                  for v in ("keras", "fastconv", "fastconv_1t", "host")]
                cells.append(_f((f - h) * 1e6 if f and h else None, "{:.0f}"))
                cells += [_f(us("train", v) and us("train", v) * 1e6, "{:.0f}")
                          for v in ("keras", "fastconv", "fastconv_1t")]
                L.append("| " + " | ".join(cells) + " |")
        L.append("")

    has_memory = any(results["runs"][b].get("memory") for b in backends)
    if has_memory:
        L.append("## Peak extra memory (MiB)")
        L.append("")
        L.append("Peak resident memory during one call minus the resident memory just before it "
                 "(VmHWM reset through /proc/self/clear_refs; glibc told to return large blocks to "
                 "the OS and trimmed before the call). It includes the call's outputs and every C "
                 "allocation, not memory a backend's allocator had cached from earlier calls. "
                 "im2col = what a full im2col buffer (KH·KW·Cin per output pixel, float32) would "
                 "take.")
        L.append("")
        L.append("| case | backend | keras fwd | fastconv fwd | keras train | fastconv train | "
                 "input | output | im2col |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        mib = 2.0 ** 20
        for c in results["cases"]:
            for b in backends:
                m = results["runs"][b].get("memory", {}).get(c)
                if not m:
                    continue
                cells = [c, b]
                for d in DIRECTIONS:
                    for v in ("keras", "fastconv"):
                        x = (m.get(d) or {}).get(v)
                        cells.append(_f(x / mib if x is not None else None, "{:.1f}"))
                cells += [f"{m[k] / mib:.1f}" for k in ("input_bytes", "output_bytes",
                                                        "im2col_bytes")]
                L.append("| " + " | ".join(cells) + " |")
        L.append("")

    L.append("## Processes")
    L.append("")
    meta = results["meta"]
    if "slow_canary" in meta:
        matmul = (f", or whose matmul rate (the median of its readings at the start, after each "
                  f"case and at the end) was under {meta['slow_matmul']}× the best process's,"
                  if "slow_matmul" in meta else "")
        L.append(f"A process whose canary's best time was over {meta['slow_canary']}× the least "
                 f"of the run's{matmul} ran slow as a whole (what a canary against its own best "
                 "cannot see): its cases were run once more, and that process's results are the "
                 "ones reported.")
        L.append("")
    L.append("| backend | cases | exit | duration | matmul GFLOP/s start / median / end | "
             "canary best | "
             "BLAS (threadpoolctl) | versions |")
    L.append("|---|---|---|---|---|---|---|---|")
    for b in backends:
        for p in results["runs"][b]["processes"]:
            env = p.get("env") or {}
            blas = "; ".join(("numpy's: " if d.get("numpy") else "also loaded: ")
                             + f"{d.get('internal_api')} {d.get('version')} "
                             f"{d.get('architecture')} {d.get('num_threads')}T "
                             f"({d.get('filename')})"
                             for d in sorted(env.get("blas", []), key=lambda d: not d.get("numpy")))
            vers = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
            exit_ = str(p["returncode"]) + (" (crash at exit tolerated)"
                                           if p["returncode"] and p.get("tolerant") else "")
            mm = " / ".join(_f(x) for x in (env.get("matmul_gflops"),
                                             p.get("matmul_median_gflops"),
                                             p.get("matmul_gflops_end")))
            if p.get("slow"):
                exit_ += f"; ran slow ({p['slow']}): run again"
            if p.get("rerun"):
                exit_ += "; the rerun"
            best = p.get("canary_best_s")
            L.append(f"| {b} | {', '.join(p['cases'])} | {exit_} | {p['duration_s']:.0f} s | "
                     f"{mm} | {_f(best and best * 1e3, '{:.2f} ms')} | {blas} | {vers} |")
    L.append("")
    configs = {}
    for b in backends:
        for p in results["runs"][b]["processes"]:
            cfg = (p.get("env") or {}).get("fastconv_show_config")
            if cfg:
                configs.setdefault(cfg, []).append(b)
    for cfg, bs in configs.items():
        L.append(f"`fastconv.show_config()` ({', '.join(sorted(set(bs)))}):")
        L.append("")
        L.append("```")
        L.append(cfg.rstrip())
        L.append("```")
        L.append("")
    failed = [(b, c, r["keras_error"]) for b in backends
              for c, r in results["runs"][b].get("cases", {}).items() if r.get("keras_error")]
    if failed:
        L.append("## Cases keras.layers.Conv2D cannot run here")
        L.append("")
        L.append("fastconv was timed alone (its error column: against Keras' layer on the "
                 "channels_last twin of the case, where there is one).")
        L.append("")
        for b, c, e in failed:
            L.append(f"- {b} {c}: {e}")
        L.append("")
    errors = [(b, c, e) for b in backends for c, e in results["runs"][b].get("errors", {}).items()]
    if errors:
        L.append("## Errors")
        L.append("")
        for b, c, e in errors:
            L.append(f"- {b} {c}: {e}")
        L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------
# Plot

def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = backends_run(results)
    cases = list(results["cases"])
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.7 * len(cases) + 2), 8), sharex=True)
    width = 0.8 / max(len(backends), 1)
    for ax, d in zip(axes, DIRECTIONS):
        for i, b in enumerate(backends):
            vals = [speedup(results, c, b, d) for c in cases]
            if not any(vals):
                continue
            xs = [j + (i - (len(backends) - 1) / 2) * width for j in range(len(cases))]
            ax.bar([x for x, v in zip(xs, vals) if v], [v for v in vals if v], width, label=b,
                   color=COLORS[b])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(1.5, color="gray", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_ylabel(f"speedup fastconv / keras ({d})")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=len(backends), loc="best", framealpha=0.7)
    axes[-1].set_xticks(range(len(cases)))
    axes[-1].set_xticklabels(cases, rotation=45, ha="right")
    fig.suptitle("fastconv.Conv2D vs keras.layers.Conv2D (same backend, same process)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results, out_dir, with_plot=True):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = markdown(results)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md + "\n")
    if with_plot:
        plot(results, os.path.join(out_dir, "speedup.png"))
    return md


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else os.path.join(os.path.dirname(__file__), "results", "results.json")
    with open(path) as f:
        results = json.load(f)
    out_dir = os.path.dirname(os.path.abspath(path))
    md = markdown(results)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md + "\n")
    plot(results, os.path.join(out_dir, "speedup.png"))
    print(f"wrote {out_dir}/results.md and speedup.png")


if __name__ == "__main__":
    main()
