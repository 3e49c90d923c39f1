"""``vlm-lightning``: the command line. ``fit|validate|test|predict`` are LightningCLI; other commands
(``export``) dispatch to their own parsers through ``EXTRA_COMMANDS``.

    vlm-lightning fit --config recipes/demo/ocr_cpu.yaml
    vlm-lightning fit --config recipes/qwen2_5_vl/qlora_sft.yaml --trainer.max_steps 100
    vlm-lightning fit --config recipes/demo/ocr_cpu.yaml --print_config > my.yaml   # round-trips

The model path is written once, at ``model.init_args.model_name_or_path``; it is linked to
``data.model_name_or_path`` so the data module builds the matching processor. Before anything is
instantiated the CLI prepares what a recipe asks for: ``demo_data`` (the synthetic OCR set, written once)
and ``tiny:<name>[@<dir>]`` model paths (a tiny model built once, see ``vlm_lightning.models.tiny``).
"""
from __future__ import annotations

import importlib
import os
import sys

from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

import vlm_lightning.distributed  # noqa: F401  registers vision_ddp, vision_fsdp, ... as Trainer(strategy=...) names
from vlm_lightning.data import VisionChatDataModule
from vlm_lightning.demo.data import DemoOCRData, write_demo_data
from vlm_lightning.models.tiny import resolve_model_path

# name -> "module:function(argv) -> exit code"; commands that are not LightningCLI subcommands
EXTRA_COMMANDS = {"export": "vlm_lightning.export.cli:export_main"}


class VLMLightningCLI(LightningCLI):
    """LightningCLI with the model path linked to the data module and recipe preparation steps."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.model_name_or_path")
        parser.add_argument("--demo_data", type=DemoOCRData | None, default=None,
                            help="write the bundled synthetic OCR set before training (see DemoOCRData)")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        demo = config.get("demo_data")
        if demo is not None:
            write_demo_data(demo)
        path = config.model.init_args.get("model_name_or_path")
        if path is not None:
            resolved = resolve_model_path(path)  # tiny:<name> -> a built directory; anything else unchanged
            config.model.init_args.model_name_or_path = resolved
            config.data.model_name_or_path = resolved

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with every ``ModelCheckpoint`` that names no ``dirpath`` writing to
        ``<default_root_dir>/checkpoints``: one fixed place per run folder, so ``--ckpt_path last`` finds the
        previous run's ``last.ckpt`` (Lightning's default, ``<logger dir>/version_N/checkpoints``, moves with
        every new logger version, and ``last`` then silently starts from scratch)."""
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        return trainer


def cli_main(args=None, run: bool = True) -> VLMLightningCLI:
    """Build the LightningCLI (any LightningModule via ``model.class_path``; the data is VisionChatDataModule).

    Example:
        >>> cli = cli_main(["fit", "--config", "recipes/demo/ocr_cpu.yaml", "--trainer.max_steps", "5"])
    """
    return VLMLightningCLI(LightningModule, VisionChatDataModule, subclass_mode_model=True, args=args, run=run,
                           save_config_kwargs={"overwrite": True})


def main(argv: list[str] | None = None) -> int | None:
    """Console entry point ``vlm-lightning``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in EXTRA_COMMANDS:
        module, func = EXTRA_COMMANDS[args[0]].split(":")
        return getattr(importlib.import_module(module), func)(args[1:])
    cli_main(argv)  # None: LightningCLI reads sys.argv itself
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
