"""Train a model from a YAML config: ``python -m ldm_lib.train CONFIG [key=value ...]``."""

from __future__ import annotations

import argparse
import sys

HELP = """\
Train stage 1 (the autoencoder, stage: vae) or stage 2 (the latent diffusion model, stage: ldm)
from a YAML config in configs/. Any value can be changed on the command line with key=value,
using the section names of the file (values are read as YAML):

  python -m ldm_lib.train configs/shapes_vae.yaml
  python -m ldm_lib.train configs/shapes_ldm_eps.yaml optim.max_steps=200 output_dir=runs/try
  python -m ldm_lib.train configs/shapes_ldm_eps.yaml diffusion.prediction_type=v_prediction
  torchrun --nproc_per_node 4 -m ldm_lib.train configs/gpu_sd_256.yaml   # one process per GPU

The run writes to output_dir: config.yaml, metrics.jsonl (one line per logging.log_every steps),
checkpoints/step_NNNNNNN.safetensors (every logging.checkpoint_every steps, written atomically),
samples/step_NNNNNNN.png (validation grids), and at the end model.safetensors (stage ldm: the
weights and their EMA, for python -m ldm_lib.sample) or vae/ (stage vae: the autoencoder with its
latent scale factor).
Running the same command again resumes from the newest checkpoint and continues exactly.
Every value is checked before anything starts; --print-config shows the full config with defaults.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ldm_lib.train", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="a YAML file, e.g. configs/shapes_ldm_eps.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=3e-4 seed=1")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)

    from .training import ConfigError, NonFiniteLossError, load_config, make_trainer

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    try:
        trainer = make_trainer(config)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        record = trainer.train()
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    if trainer.dist.is_main:
        print(
            f"done: step {trainer.step}, "
            + ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step")
        )
        print(f"outputs in {trainer.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
