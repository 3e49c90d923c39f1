"""`vlm-lightning export merge|gguf|push`: the export functions from the command line, for runs that ended
without the MergeLoRA / GGUFExport callbacks.

    vlm-lightning export merge --checkpoint runs/demo/adapter --out runs/demo/merged
    vlm-lightning export gguf  --checkpoint runs/demo/merged  --out runs/demo/gguf --quant q8_0
    vlm-lightning export gguf  --checkpoint runs/demo/last.ckpt --out runs/demo/gguf --quant q4_k_m
    vlm-lightning export push  --path runs/demo/gguf --repo me/demo-gguf

`--checkpoint` takes an adapter folder (PeftModel.save_pretrained / save_adapter), a Lightning `.ckpt` of
VisionSFTModule or VisionGRPOModule (LoRA or full fine-tune; read through its `vlm_lightning` block), or
(gguf only) an already merged folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .hub import HubUploadError, push_folder

__all__ = ["export_main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from .gguf import GGUF_QUANTS  # heavy import: the gguf writer and its numpy quantisers

    p = argparse.ArgumentParser(prog="vlm-lightning export", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, what: str):
        sp.add_argument("--checkpoint", required=True, help=f"adapter folder, Lightning .ckpt{what}")
        sp.add_argument("--out", required=True, help="output folder")
        sp.add_argument("--base", default=None,
                        help="16-bit base model (default: the one recorded in the adapter/ckpt)")
        sp.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="merged weight dtype")
        sp.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                        help="upload the result (token from HF_TOKEN)")
        sp.add_argument("--public", action="store_true", help="create the Hub repo public (default private)")

    m = sub.add_parser("merge", help="merge the LoRA into 16-bit weights (sharded safetensors + processor)")
    common(m, "")
    m.add_argument("--max-shard-size", default="2GB")

    g = sub.add_parser("gguf", help="write <name>-<quant>.gguf + mmproj-<name>-f16.gguf for llama.cpp")
    common(g, " or merged model folder")
    g.add_argument("--quant", action="append", default=None, choices=list(GGUF_QUANTS),
                   help="repeatable; default q8_0")
    g.add_argument("--name", default=None, help="file name stem (default: the merged folder's name)")
    g.add_argument("--mmproj-quant", default="f16", choices=["f16", "f32", "bf16", "q8_0"])
    g.add_argument("--no-mmproj", action="store_true", help="text model only")
    g.add_argument("--approximate-mmproj", action="store_true",
                   help="LLaVA-NeXT: write the mmproj although llama.cpp's image token layout differs (docs/export.md)")

    u = sub.add_parser("push", help="upload a folder (merged model, adapter or GGUF files) to the Hub")
    u.add_argument("--path", required=True)
    u.add_argument("--repo", required=True)
    u.add_argument("--public", action="store_true")
    return p


def _is_merged_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def export_main(argv: list[str] | None = None) -> int:
    """Entry point of `vlm-lightning export ...`; returns the exit code.

    Example:
        >>> export_main(["merge", "--checkpoint", "runs/adapter", "--out", "runs/merged"])  # doctest: +SKIP
        0
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    try:
        if args.command == "push":
            print(push_folder(args.path, args.repo, private=not args.public))
            return 0
        ckpt = Path(args.checkpoint)
        if not ckpt.exists():
            raise FileNotFoundError(f"--checkpoint {ckpt} does not exist")
        if args.command == "merge":
            from .merge import merge_lora  # heavy import (peft, transformers): only for the merge

            out = merge_lora(ckpt, args.out, base_name_or_path=args.base, max_shard_size=args.max_shard_size,
                             dtype=args.dtype, push_to_hub=args.push_to_hub, private=not args.public)
            print(f"merged model written to {out}")
            return 0
        from .gguf import to_gguf  # heavy import: the gguf writer

        out = Path(args.out)
        if _is_merged_folder(ckpt):
            merged = ckpt
        else:
            from .merge import merge_lora  # heavy import (peft, transformers): only for the merge

            merged = merge_lora(ckpt, out / "merged", base_name_or_path=args.base, dtype=args.dtype)
            print(f"merged model written to {merged}")
        for i, q in enumerate(args.quant or ["q8_0"]):
            paths = to_gguf(merged, out, quant=q, name=args.name, mmproj=not args.no_mmproj and i == 0,
                            approximate_mmproj=args.approximate_mmproj,
                            mmproj_quant=args.mmproj_quant)
            for kind, path in paths.items():
                print(f"{kind}: {path}")
        if args.push_to_hub:
            push_folder(out, args.push_to_hub, private=not args.public, allow_patterns=["*.gguf"])
        return 0
    except HubUploadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(export_main())
