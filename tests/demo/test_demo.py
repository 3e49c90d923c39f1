"""The CPU demo (`make demo`): its data and model options, and the whole path at a reduced step count through the
real CLI: fit -> export merge (last.ckpt) -> export gguf -> the llama.cpp read-back. No timing assertions: how
fast and how well the full demo learns is measured by hand (README, recipes/demo/ocr_cpu.yaml)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from vlm_lightning.cli import main
from vlm_lightning.demo.data import PROMPT, make_demo_ocr_dataset

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes/demo/ocr_cpu.yaml"


def _makefile_demo_commands() -> list[str]:
    text = (ROOT / "Makefile").read_text()
    body = text.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    return [line.strip().replace("$(BIN)/", "") for line in body.splitlines()[1:] if line.startswith("\t")]


def test_demo_rows_put_the_image_last_and_never_show_the_answer(tmp_path):
    paths = make_demo_ocr_dataset(tmp_path, n_train=30, n_val=5, num_digits=2, layout="fixed", prompt="Read.",
                                  image_last=True)
    answers = {}
    for split in ("train", "val"):
        rows = [json.loads(line) for line in paths[split].read_text().splitlines()]
        answers[split] = {r["messages"][1]["content"][0]["text"] for r in rows}
        for r in rows:
            user = r["messages"][0]["content"]
            assert [p["type"] for p in user] == ["text", "image"] and user[0]["text"] == "Read."
    assert not answers["train"] & answers["val"]
    # the default layout is unchanged (other tests and recipes rely on it)
    rows = make_demo_ocr_dataset(tmp_path / "default", n_train=2, n_val=1)["train"].read_text().splitlines()
    user = json.loads(rows[0])["messages"][0]["content"]
    assert user[0]["type"] == "image" and user[1]["text"] == PROMPT


def test_demo_preset_has_no_default_system_turn_and_short_rows(tmp_path):
    from vlm_lightning.data import VisionChatDataModule
    from vlm_lightning.models.tiny import resolve_model_path

    model_dir = resolve_model_path(f"tiny:ocr_demo@{tmp_path / 'base'}")
    paths = make_demo_ocr_dataset(tmp_path / "data", n_train=4, n_val=2, num_digits=2, layout="fixed",
                                  prompt="Read.", image_last=True)
    dm = VisionChatDataModule(model_dir, train=str(paths["train"]), val=str(paths["val"]), batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    text = dm.processor.tokenizer.decode(batch["input_ids"][0])
    assert "system" not in text and text.startswith("<|im_start|>user\nRead.<|vision_start|>"), text
    assert batch["input_ids"].shape[1] <= 32  # 8 image tokens, 2 answer digits + end of turn, little else
    assert int((batch["labels"][0] != -100).sum()) == 3


def test_a_folder_built_by_an_older_preset_is_rebuilt(tmp_path):
    from vlm_lightning.models.tiny import resolve_model_path

    target = tmp_path / "base"
    resolve_model_path(f"tiny:ocr_demo@{target}")
    (target / "tiny_preset.json").write_text("{}")  # as if an older preset had built it
    (target / "stale").write_text("")
    resolve_model_path(f"tiny:ocr_demo@{target}")
    assert not (target / "stale").exists() and (target / "config.json").exists()


def test_demo_recipe_runs_the_whole_path(tmp_path, monkeypatch, capsys):
    """What `make demo` runs, in the same order, with 4 training steps."""
    commands = _makefile_demo_commands()
    assert commands[0] == f"vlm-lightning fit --config {RECIPE.relative_to(ROOT)}"
    assert commands[-1].startswith("python -m vlm_lightning.demo.ask_gguf")
    monkeypatch.chdir(tmp_path)  # the recipe writes under runs/
    main(["fit", "--config", str(RECIPE), "--demo_data.n_train", "16", "--demo_data.n_val", "4",
          "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.max_steps", "4",
          "--trainer.val_check_interval", "4", "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    assert "[demo] before training: val CER" in out and "[demo] validation CER" in out, out
    assert re.search(r"reference +'\d\d' +prediction", out), out
    assert (tmp_path / "runs/demo/base/config.json").exists()  # tiny model built on first use
    assert (tmp_path / "runs/demo/checkpoints/last.ckpt").exists()

    for command in commands[1:3]:  # vlm-lightning export merge ..., vlm-lightning export gguf ...
        assert main(command.split()[1:]) == 0, command
    assert (tmp_path / "runs/demo/merged/config.json").exists()
    ggufs = sorted(p.name for p in (tmp_path / "runs/demo/gguf").glob("*.gguf"))
    assert ggufs == ["merged-q8_0.gguf", "mmproj-merged-f16.gguf"], ggufs

    from vlm_lightning.demo import ask_gguf

    capsys.readouterr()
    assert ask_gguf.main(commands[3].split()[3:]) == 0
    out = capsys.readouterr().out
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert "llama_cpp is not installed" in out, out
    else:
        assert len(re.findall(r"reference +'\d\d' +llama\.cpp answer '", out)) == 3, out


def test_demo_tail_says_so_without_llama_cpp(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp" or name.startswith("llama_cpp."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    from vlm_lightning.demo import ask_gguf

    assert ask_gguf.main(["--gguf", "nowhere"]) == 0
    assert capsys.readouterr().out.count("\n") == 1

