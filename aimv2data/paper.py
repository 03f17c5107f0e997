"""The paper's constants, each defined once with its citation (AIMv2, Fini et al. 2024; the text is in
/work/shared/reference/). Everything else imports them from here: aimv2data (the data side) may not
import aimv2train, and aimv2train may import aimv2data, so this is the one place both can read.
"""
from __future__ import annotations

# Appendix B "Hyperparameters", pre-training: "we adopt the tokenizer used by SigLIP and truncate any
# text longer than 77 tokens".
TEXT_LEN = 77

# Table 1 (ViT-L/14 ... ViT-3B/14): every AIMv2 encoder uses 14 x 14 pixel patches.
PATCH_SIZE = 14

# §2.4 "Native Resolution Fine-tuning": A = 2^n patches per image, n sampled in [7, 12] (128 .. 4096).
AREAS = tuple(2**n for n in range(7, 13))

# Image normalisation: OpenAI CLIP's mean / std, which apple/ml-aim's AIMv2 preprocessing also uses.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

# Table A1 (B1 in some versions) augmentations: RandomResizedCrop 224 px, scale [0.4, 1.0], ratio
# [0.75, 1.33] (printed rounded: torchvision's default (3/4, 4/3), which the loader has always used),
# bicubic; RandomHorizontalFlip p = 0.5.
RRC_SCALE = (0.4, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
HFLIP = 0.5

# Table 2 "Pre-training data mixture": the sampling probability of each source and caption type, in percent
# as printed (the rows sum to 97 %). A source's share is its row's sum (DFN 60, COYO 6, HQITP 31: the
# loader's default source mixture, loader/sampler.py); within a source, alt-text against synthetic captions
# (loader/captions.py: P(alt | DFN) = 0.5, COYO 1, HQITP 28/31).
TABLE2 = {"dfn": {"alt": 30, "synthetic": 30}, "coyo": {"alt": 6, "synthetic": 0},
          "hqitp": {"alt": 28, "synthetic": 3}}

# The patch budget A a native-resolution image gets by default in evaluation (`aimv2 embed` and `aimv2 probe
# --max-patches`, one default so both see an image alike): a 224 px image's grid, the pre-training resolution.
EVAL_MAX_PATCHES = (224 // PATCH_SIZE) ** 2   # 256
