"""Open every ``*.gguf`` of a folder with gguf-py's ``GGUFReader``: tensor count, tensor-type histogram,
architecture and file size, one JSON line per file (``RESULT {...}``; appended to ``--jsonl``).

    python benchmarks/e2e/gguf_inspect.py <gguf folder> --jsonl out.jsonl
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path


def inspect_file(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    hist = collections.Counter(t.tensor_type.name for t in reader.tensors)
    arch = None
    field = reader.fields.get("general.architecture")
    if field is not None:
        arch = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    file_type = None
    ft = reader.fields.get("general.file_type")
    if ft is not None:
        file_type = int(ft.parts[ft.data[0]][0])
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    return {"file": path.name, "gb": round(path.stat().st_size / 1e9, 3), "architecture": arch, "file_type": file_type,
            "tensors": len(reader.tensors), "params": n_params, "kv": len(reader.fields),
            "types": dict(sorted(hist.items()))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--jsonl", default=None)
    p.add_argument("--label", default="gguf_inspect")
    args = p.parse_args()
    files = sorted(Path(args.folder).glob("*.gguf"))
    rc = 0 if files else 1
    rows = []
    for f in files:
        try:
            rows.append({"stage": args.label, "ok": True, **inspect_file(f)})
        except Exception as err:  # noqa: BLE001 - one unreadable file is reported, the others still read
            rows.append({"stage": args.label, "ok": False, "file": f.name, "error": f"{type(err).__name__}: {err}"})
            rc = 1
    if not files:
        rows.append({"stage": args.label, "ok": False, "error": f"no *.gguf in {args.folder}"})
    for row in rows:
        print("RESULT " + json.dumps(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
