"""Run ``vlm-lightning export ...`` (the same entry point, same arguments) with timers around its stages.

    python benchmarks/e2e/export_timed.py --jsonl out.jsonl --label merge7b -- merge --checkpoint X --out Y
  = vlm-lightning export merge --checkpoint X --out Y, plus one JSON line with:
    merge: wall_s, load_source_s (checkpoint/adapter read, module rebuild), load_base_s (16-bit base
           reload), merge_s (PEFT merge_and_unload + finite check), save_s (the rest: safetensors + processor)
    gguf:  wall_s and, per file, the time of each writer call (text model per quant, mmproj) and of
           llama.cpp's K-quantiser; one line is appended after every ``to_gguf`` call, so a run cut off by
           a timeout still leaves the finished quants' times.
The wrappers only time the functions they wrap; behaviour is unchanged.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path


def main() -> int:
    # run as a script, this folder is sys.path[0]: drop it, so the export imports what `vlm-lightning export` would
    # (no module of benchmarks/ can pass for a package of the same name, e.g. the Hub's `kernels`)
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != here]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jsonl", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the arguments of `vlm-lightning export`")
    args = p.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    t_start = time.perf_counter()
    timings: dict = {}
    events: list = []

    def emit(extra: dict) -> None:
        row = {"stage": args.label, "command": "vlm-lightning export " + " ".join(argv), **extra}
        Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print("E2E_EXPORT " + json.dumps(row, default=str), flush=True)

    def timed(module, names, key: str | None = None, on_done=None):
        """Wrap the first of ``names`` the module has (the export code is still moving); else note it."""
        names = [names] if isinstance(names, str) else names
        name = next((n for n in names if callable(getattr(module, n, None))), None)
        if name is None:
            timings.setdefault("not_timed", []).append("/".join(names))
            return
        fn = getattr(module, name)

        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t = time.perf_counter()
            result = fn(*a, **kw)
            dt = round(time.perf_counter() - t, 2)
            k = key or name
            timings[k] = round(timings.get(k, 0.0) + dt, 2)
            events.append({"fn": name, "s": dt, **_describe(name, a, kw)})
            if on_done is not None:
                on_done(result, dt)
            return result

        setattr(module, name, wrapper)

    import vlm_lightning.cli as cli

    if argv and argv[0] == "merge":
        import vlm_lightning.export.merge as merge

        timed(merge, ["resolve_source", "resolve_lora_source"], "load_source_s")
        timed(merge, "load_processor", "load_processor_s")
        timed(merge, "load_base_16bit", "load_base_s")
        timed(merge, "merge_lora_into", "merge_s")
        timed(merge, "apply_full_weights", "merge_s")
        timed(merge, "merge_lora", "merge_lora_total_s")
    elif argv and argv[0] == "gguf":
        import vlm_lightning.export.gguf as gguf_pkg
        import vlm_lightning.export.gguf.writer as gguf_mod

        timed(gguf_mod, "_write_text")
        timed(gguf_mod, "_write_mmproj")
        timed(gguf_mod, "_kquantize")

        def after_to_gguf(result, dt):
            files = {k: {"path": str(v), "gb": round(Path(v).stat().st_size / 1e9, 3)} for k, v in result.items()
                     if Path(v).exists()}
            emit({"partial": True, "to_gguf_s": dt, "files": files, "events": list(events),
                  "elapsed_s": round(time.perf_counter() - t_start, 1)})

        timed(gguf_pkg, "to_gguf", on_done=after_to_gguf)  # the CLI takes it from the package
    rc = cli.main(["export", *argv])
    rc = 0 if rc is None else rc
    wall = round(time.perf_counter() - t_start, 1)
    if argv and argv[0] == "merge" and "merge_lora_total_s" in timings:
        known = sum(float(timings.get(k, 0.0)) for k in ("load_source_s", "load_processor_s", "load_base_s", "merge_s"))
        timings["save_s"] = round(timings["merge_lora_total_s"] - known, 2)
    emit({"rc": rc, "wall_s": wall, **timings, "events": events})
    return rc


def _describe(name: str, a: tuple, kw: dict) -> dict:
    """Which file / quant a writer call was for (positional layout of vlm_lightning.export.gguf.writer)."""
    try:
        if name in ("_write_text", "_write_mmproj"):
            return {"file": Path(a[0]).name, "quant": a[5] if len(a) > 5 else kw.get("quant")}
        if name == "_kquantize":
            return {"src": Path(a[0]).name, "dst": Path(a[1]).name, "quant": a[2]}
        if name == "to_gguf":
            return {"quant": kw.get("quant", a[2] if len(a) > 2 else None)}
    except Exception:  # noqa: BLE001 - a description is optional
        pass
    return {}


if __name__ == "__main__":
    sys.exit(main())
