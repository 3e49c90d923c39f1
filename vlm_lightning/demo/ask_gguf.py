"""The CPU demo's last step: read validation images with the exported GGUF through llama.cpp.

    python -m vlm_lightning.demo.ask_gguf --gguf runs/demo/gguf --val runs/demo/data/val.jsonl

Takes the first ``--rows`` rows of the demo's validation set (numbers never trained on), sends each image with
the row's own question through llama-cpp-python's generic multimodal chat handler (the chat template stored in
the GGUF, the vision tower and projector from the mmproj), decodes greedily and prints the answer next to the
reference. Without ``llama_cpp`` (``pip install llama-cpp-python``, or the ``test`` extra) it prints one line
saying so and exits 0: the GGUF files are still there for llama.cpp's own tools (README, "Running the exported
files with llama.cpp"). Left out: comparing logits with the HF model (``llama_cpp.py`` does, for the tests).
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

__all__ = ["find_gguf_pair", "llama_cpp_messages", "answer_with_llama_cpp", "main"]


def find_gguf_pair(folder: str | Path) -> tuple[Path, Path]:
    """``(<name>-<quant>.gguf, mmproj-<name>-<quant>.gguf)`` in ``folder``, as ``vlm-lightning export gguf`` writes."""
    folder = Path(folder)
    ggufs = sorted(folder.glob("*.gguf"))
    mmproj = [p for p in ggufs if p.name.startswith("mmproj-")]
    models = [p for p in ggufs if not p.name.startswith("mmproj-")]
    if not models or not mmproj:
        raise FileNotFoundError(f"{folder}: expected a model .gguf and an mmproj-*.gguf (vlm-lightning export gguf)")
    return models[0], mmproj[0]


def llama_cpp_messages(row: dict, root: Path) -> tuple[list[dict], str]:
    """The row's user turn in the OpenAI form llama-cpp-python takes (images as data URIs, order kept) and the
    reference answer (the assistant turn, which is never sent)."""
    user, assistant = row["messages"][0], row["messages"][1]
    content = []
    for part in user["content"]:
        if part["type"] == "image":
            data = base64.b64encode((root / part["image"]).read_bytes()).decode()
            content.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
        else:
            content.append({"type": "text", "text": part["text"]})
    reference = "".join(p["text"] for p in assistant["content"] if p["type"] == "text")
    return [{"role": "user", "content": content}], reference


def answer_with_llama_cpp(model: str | Path, mmproj: str | Path, rows: list[dict], root: Path,
                          max_tokens: int = 8) -> list[tuple[str, str]]:
    """``(reference, llama.cpp's greedy answer)`` for each row. Needs ``llama_cpp``.

    Example:
        >>> model, mmproj = find_gguf_pair("runs/demo/gguf")
        >>> answer_with_llama_cpp(model, mmproj, rows[:1], Path("runs/demo/data"))
        [('37', '37')]
    """
    from llama_cpp import Llama  # optional dependency: main() checks for it first
    from llama_cpp.llama_chat_format import MTMDChatHandler  # optional dependency

    handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False, use_gpu=False)
    llm = Llama(model_path=str(model), chat_handler=handler, n_ctx=512, n_threads=2, verbose=False)
    out = []
    try:
        for row in rows:
            messages, reference = llama_cpp_messages(row, root)
            reply = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0)
            out.append((reference, (reply["choices"][0]["message"]["content"] or "").strip()))
    finally:
        llm.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlm_lightning.demo.ask_gguf", description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default="runs/demo/gguf", help="folder with the model .gguf and its mmproj")
    p.add_argument("--val", default="runs/demo/data/val.jsonl", help="the demo's validation rows")
    p.add_argument("--rows", type=int, default=3, help="how many validation images to read")
    args = p.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401  optional dependency: without it the demo ends here
    except ImportError:
        print("[demo] llama_cpp is not installed (pip install llama-cpp-python): skipped reading a validation "
              f"image through llama.cpp; the GGUF files are in {args.gguf}")
        return 0
    model, mmproj = find_gguf_pair(args.gguf)
    val = Path(args.val)
    rows = [json.loads(line) for line in val.read_text().splitlines()[: args.rows]]
    answers = answer_with_llama_cpp(model, mmproj, rows, val.parent)
    print(f"[demo] llama.cpp with {model.name} + {mmproj.name} on validation images:")
    for reference, answer in answers:
        print(f"    reference {reference!r:>8}   llama.cpp answer {answer!r}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
