"""Validator: every evaluation reads the same held-out batches (the loader rewound with its own
`load_state_dict`), even when one evaluation runs past the end of a loader segment."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _train_fixtures  # noqa: E402

from aimv2train.train.distributed import DistInfo  # noqa: E402
from aimv2train.train.tokenizer import Tokenizer  # noqa: E402
from aimv2train.train.validate import Validator  # noqa: E402

torch.set_num_threads(1)


class Recorder(torch.nn.Module):
    """Stands in for AIMv2: records what each evaluation saw; its losses are a function of the pixels."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def training_loss(self, images, patches, tokens, pad_id, prefix_len):
        self.seen.append((images.clone(), tokens.clone(), prefix_len.clone()))
        img = images.float().square().mean()
        return img, {"loss_img": img, "loss_text": tokens.float().mean()}


@pytest.mark.parametrize("native", [False, True])
def test_every_evaluation_sees_the_same_batches(tmp_path, native):
    manifest, tok = _train_fixtures.build(tmp_path)
    v = Validator(str(manifest), Tokenizer(str(tok)), DistInfo(), torch.device("cpu"), native_res=native,
                  resolution=56, batch_size=8, batch_patches=4096, max_batches=3)
    model = Recorder().train()
    runs = []
    for _ in range(3):
        model.seen = []
        runs.append((v(model), model.seen))
        assert model.training  # put back in training mode
    first_out, first = runs[0]
    assert first and first_out["val_images"] == sum(len(x[0]) for x in first)
    for out, seen in runs[1:]:
        assert out == first_out and len(seen) == len(first)
        for a, b in zip(seen, first):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
