"""Markdown tables from the JSON lines of benchmarks/bench_e2e.sh:  python benchmarks/e2e/report.py e2e.jsonl"""
from __future__ import annotations

import json
import sys


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    return str(v)


def main(path: str) -> None:
    rows = []
    for line in open(path):
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append({"stage": "unparsed", "line": line[:200]})
    status = [r for r in rows if r.get("kind") == "status"]
    by = {}
    for r in rows:
        if r.get("kind") != "status":
            by.setdefault(r.get("stage"), []).append(r)
    out = ["# End-to-end chain (benchmarks/bench_e2e.sh)", ""]

    out += ["## Stages", "", "| stage | rc | wall s | limit s | note |", "|---|---|---|---|---|"]
    for r in status:
        note = r.get("skipped") or ("TIMED OUT" if r.get("timed_out") else "")
        out.append(f"| {r['stage']} | {fmt(r.get('rc'))} | {fmt(r.get('wall_s'))} | {fmt(r.get('limit_s'))} | {note} |")

    prep = (by.get("prepare") or [{}])[-1]
    fit = (by.get("fit7b") or [{}])[-1]
    merge = [r for r in by.get("merge7b", []) if "rc" in r]
    merge = merge[-1] if merge else {}
    check = (by.get("check7b_result") or [{}])[-1]
    base = prep.get("base") or {}
    out += ["", "## 7B-shape chain (Qwen2.5-VL-7B shape, random weights, recipes/qwen2_5_vl/lora_sft.yaml)", "",
            "| figure | value |", "|---|---|"]
    figures = [
        ("base params", base.get("params")), ("base build s (GPU init)", base.get("build_s")),
        ("base save s (bf16 safetensors)", base.get("save_s")), ("base GB", base.get("safetensors_gb")),
        ("fit: process start -> first Trainer hook s", fit.get("process_to_setup_s")),
        ("fit: model load (configure_model) s", fit.get("model_load_s")),
        ("fit: fit start -> first optimizer step s", fit.get("setup_to_first_step_s")),
        ("fit: process start -> first optimizer step s", fit.get("process_to_first_step_s")),
        ("fit: optimizer steps", fit.get("optimizer_steps")),
        ("fit: steps/s (steps 2..N)", fit.get("steps_per_s")), ("fit: s/step", fit.get("s_per_step")),
        ("fit: tokens/s (steps 2..N)", fit.get("tokens_per_s")), ("fit: peak GiB", fit.get("peak_gib")),
        ("fit: last train/loss", fit.get("loss")),
        ("merge: wall s (process)", merge.get("wall_s")),
        ("merge: read checkpoint + rebuild s", merge.get("load_source_s")),
        ("merge: load 16-bit base s", merge.get("load_base_s")), ("merge: PEFT merge s", merge.get("merge_s")),
        ("merge: save s", merge.get("save_s")), ("merge rc", merge.get("rc")),
        ("check: ok", check.get("ok")), ("check: LoRA targets", check.get("lora_targets")),
        ("check: other tensors (bit-identical required)", check.get("other_tensors")),
        ("check: other tensors not identical", check.get("other_not_identical")),
        ("check: elements past bf16 bound", check.get("elements_past_bound")),
        ("check: worst err / bound", check.get("worst_err_over_bound")),
        ("check: mean abs err merged vs unmerged",
         f"{fmt(check.get('mean_abs_err_merged'))} vs {fmt(check.get('mean_abs_err_if_unmerged'))}" if check else None),
        ("check: changed fraction of targeted elements", check.get("changed_fraction")),
        ("check: architectures", check.get("architectures")), ("check s", check.get("check_s")),
    ]
    out += [f"| {k} | {fmt(v)} |" for k, v in figures]
    if check.get("failures"):
        out += ["", "check failures: " + "; ".join(map(str, check["failures"]))[:2000]]

    plan = (by.get("gguf_plan") or [{}])[-1]
    gstages = [st for st in by if st and st.startswith("gguf7b") and not st.endswith("_inspect")]
    if gstages or plan:
        out += ["", f"## GGUF of the merged 7B-shape model (mode {plan.get('mode')}: single = one `export gguf` "
                "with every --quant; parallel/sequential = one process per quant)", "",
                "| process | call | file | quant | s |", "|---|---|---|---|---|"]
    for st in sorted(gstages):
        gg = by[st]
        final = [r for r in gg if "rc" in r]
        events = final[-1]["events"] if final else (gg[-1].get("events", []) if gg else [])
        for e in events:
            out.append(f"| {st} | {e.get('fn')} | {e.get('file') or e.get('dst') or ''} | {e.get('quant') or ''} | "
                       f"{fmt(e.get('s'))} |")
        if final:
            out.append(f"| {st} | process wall (rc {final[-1].get('rc')}) | | | {fmt(final[-1].get('wall_s'))} |")
        else:
            out.append(f"| {st} | did not finish | | | |")
    insp = [r for st in sorted(by) if st and st.startswith("gguf7b") and st.endswith("_inspect") for r in by[st]]
    if insp:
        out += ["", "GGUFReader:", "", "| file | GB | tensors | params | types |", "|---|---|---|---|---|"]
        for r in insp:
            types = ", ".join(f"{k} {v}" for k, v in (r.get("types") or {}).items()) or r.get("error", "")
            out.append(f"| {r.get('file')} | {fmt(r.get('gb'), 3)} | {fmt(r.get('tensors'))} | "
                       f"{fmt(r.get('params'))} | {types} |")

    strat_names = []
    for r in status:
        st = r["stage"]
        if st.startswith("strat_") and st.endswith("_fit"):
            strat_names.append(st[len("strat_"):-len("_fit")])
    if strat_names:
        out += ["", "## Strategy recipes (lora_sft.yaml + recipes/strategies/<name>.yaml, small Qwen2.5-VL, 1 GPU)", "",
                "| strategy | fit rc | fit wall s | fit start -> 1st step s | steps/s | peak GiB | loss | merge "
                "| check |",
                "|---|---|---|---|---|---|---|---|---|"]
        st_by = {r["stage"]: r for r in status}
        for s in strat_names:
            f = st_by.get(f"strat_{s}_fit", {})
            t = (by.get(f"strat_{s}_timer") or [{}])[-1]
            merge_stages = (f"strat_{s}_merge_folder", f"strat_{s}_zero_to_fp32", f"strat_{s}_merge")
            merges = [st_by[k] for k in merge_stages if k in st_by]
            mtxt = ", ".join(f"{m['stage'][len('strat_' + s) + 1:]} rc {m.get('rc')}" for m in merges) or "-"
            c = (by.get(f"strat_{s}_check_result") or [{}])[-1]
            failures = "; ".join(map(str, c.get("failures", [])))[:200]
            ctxt = "-" if not c else ("ok" if c.get("ok") else "FAIL: " + failures)
            skipped = " " + f["skipped"] if f.get("skipped") else ""
            out.append(f"| {s} | {fmt(f.get('rc'))}{skipped} | {fmt(f.get('wall_s'))} | "
                       f"{fmt(t.get('setup_to_first_step_s'))} | {fmt(t.get('steps_per_s'))} | "
                       f"{fmt(t.get('peak_gib'))} | {fmt(t.get('loss'))} | {mtxt} | {ctxt} |")
    ct = by.get("cuda_tests_summary")
    if ct:
        out += ["", f"## CUDA tests (pytest -m cuda, kernels and the 7B SFT check deselected): {ct[-1].get('summary')}"]
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
