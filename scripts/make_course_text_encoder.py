"""Write models/course_text_encoder: the frozen text encoder shared by the course's tiny models.

A "tiny" CLIP text transformer (64 wide, 2 blocks; ldm_lib.models.text) with seeded random weights,
never trained. Frozen and random, it still maps each caption of the shapes grammar to a distinct
sequence of 77 token embeddings (the causal attention mixes each word with the words before it),
and the UNet's cross-attention learns to read them. Saved in fp16 (6 MB); loaded as fp32.

    python scripts/make_course_text_encoder.py [--out models/course_text_encoder]
"""

from __future__ import annotations

import argparse

import torch

from ldm_lib.models.text import build_text_encoder, text_encoder_config


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="models/course_text_encoder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    encoder = build_text_encoder(text_encoder_config("tiny"))
    encoder.half().save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
