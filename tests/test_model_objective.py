"""Prefix attention and the AIMv2 objective: who sees what, and which targets count."""
import pytest
import torch
import torch.nn.functional as F

from aimv2train.model.config import EncoderConfig, model_config
from aimv2train.model.encoder import Encoder
from aimv2train.model.masks import prefix_causal_mask, sample_prefix_lengths, target_mask
from aimv2train.model.aimv2 import AIMv2
from aimv2train.model.objective import normalize_patches, pixel_loss, text_loss

torch.set_num_threads(1)
P = 14


def _tiny_model(pos="learned", img_size=56):
    torch.manual_seed(0)
    return AIMv2(model_config("tiny", pos_embed=pos, img_size=img_size)).eval()


def _set_patch(images, index, grid_w, value):
    """Overwrite patch `index` (row-major) of every image."""
    r, c = divmod(index, grid_w)
    out = images.clone()
    out[:, :, r * P:(r + 1) * P, c * P:(c + 1) * P] = value
    return out


def test_prefix_mask_matrix():
    m = prefix_causal_mask(torch.tensor([2, 4]), 5)
    assert m.shape == (2, 1, 5, 5) and m.dtype == torch.bool
    expected_m2 = torch.tensor([[1, 1, 0, 0, 0],  # query 0 sees the prefix {0, 1}
                                [1, 1, 0, 0, 0],
                                [1, 1, 1, 0, 0],  # query 2 sees the prefix and itself
                                [1, 1, 1, 1, 0],
                                [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m[0, 0], expected_m2)
    assert torch.equal(m[1, 0, :4, :4], torch.ones(4, 4, dtype=torch.bool))  # prefix of 4: bidirectional
    assert torch.equal(m[1, 0, 4], torch.ones(5, dtype=torch.bool))


def test_prefix_lengths_uniform_in_range_and_reproducible():
    g = torch.Generator().manual_seed(3)
    m = sample_prefix_lengths(4000, 6, g)
    assert m.min() == 1 and m.max() == 5  # U{1, ..., I-1}
    counts = torch.bincount(m, minlength=6)[1:].float()
    assert (counts / counts.sum() - 0.2).abs().max() < 0.03
    again = sample_prefix_lengths(4000, 6, torch.Generator().manual_seed(3))
    assert torch.equal(m, again)
    with pytest.raises(ValueError, match="at least 2 patches"):
        sample_prefix_lengths(2, 1)


def test_encoder_prefix_outputs_do_not_see_later_patches():
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(dim=64, depth=2, heads=2, pos_embed="sincos")).eval()
    grid_w, n, M = 5, 15, 6
    x = torch.randn(2, 3, 3 * P, grid_w * P)
    mask = prefix_causal_mask(torch.tensor([M, M]), n)
    with torch.no_grad():
        base = enc(x, mask)
        later = enc(_set_patch(x, 9, grid_w, 3.0), mask)  # change patch 9 >= M
        in_prefix = enc(_set_patch(x, 4, grid_w, 3.0), mask)  # change patch 4 < M
        unmasked = enc(x)
        unmasked_later = enc(_set_patch(x, 9, grid_w, 3.0))
    # outputs before M (and every causal position before 9) do not move; 9 onwards do
    torch.testing.assert_close(base[:, :9], later[:, :9], rtol=0, atol=1e-6)
    assert (base[:, 9:] - later[:, 9:]).abs().amax(dim=-1).min() > 1e-3
    # a prefix patch is seen by every position, earlier prefix positions included (bidirectional prefix)
    assert (base - in_prefix).abs().amax(dim=-1).min() > 1e-3
    # inference (no mask) is fully bidirectional
    assert (unmasked[:, :9] - unmasked_later[:, :9]).abs().amax(dim=-1).min() > 1e-3


@pytest.mark.parametrize("M", [1, 4, 11])
def test_counted_pixel_predictions_never_see_their_target(M):
    """Prediction of patch t (t >= M, counted) must not depend on patches >= t: change patch t and
    every counted prediction up to t stays bit-identical."""
    model = _tiny_model(pos="sincos")
    grid_w, n = 4, 12
    x = torch.randn(1, 3, 3 * P, grid_w * P)
    tokens = torch.randint(3, 512, (1, 77))
    pl = torch.tensor([M])
    with torch.no_grad():
        pred, _ = model(x, tokens, pl)
        for t in range(M, n):
            pred_t, _ = model(_set_patch(x, t, grid_w, 2.5), tokens, pl)
            # predictions 0..t-1 target patches 1..t: unchanged; prediction t (of patch t+1) sees patch t
            torch.testing.assert_close(pred[:, :t], pred_t[:, :t], rtol=0, atol=1e-6,
                                       msg=f"a prediction of a patch <= {t} saw patch {t}")
            if t < n - 1:
                assert (pred[:, t] - pred_t[:, t]).abs().max() > 1e-4
    counted = target_mask(pl, n)[0]
    assert counted.tolist() == [i + 1 >= M for i in range(n - 1)]


def test_text_logits_are_causal_and_start_from_the_last_image_position():
    model = _tiny_model()
    x = torch.randn(1, 3, 56, 56)
    tok = torch.randint(3, 512, (1, 77))
    tok2 = tok.clone()
    tok2[:, 10:] = torch.randint(3, 512, (1, 67))
    with torch.no_grad():
        _, a = model(x, tok, torch.tensor([5]))
        _, b = model(x, tok2, torch.tensor([5]))
        _, c = model(torch.randn(1, 3, 56, 56), tok, torch.tensor([5]))
    assert a.shape == (1, 77, 512)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)  # logits for tokens 0..9 see only tokens 0..8
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-4
    assert (a[:, 0] - c[:, 0]).abs().max() > 1e-4  # token 0 is predicted from the image


def test_pixel_loss_counts_only_non_prefix_targets():
    torch.manual_seed(0)
    B, n, D = 2, 8, 588
    patches = torch.randn(B, n, D) * 3 + 1
    pred = torch.randn(B, n - 1, D)
    pl = torch.tensor([3, 6])
    loss = pixel_loss(pred, patches, pl)
    # by hand: target t counts iff t >= M; prediction t-1 is for target t
    tgt = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    terms = [((pred[b, t - 1] - tgt[b, t]) ** 2).mean() for b in range(B) for t in range(1, n) if t >= pl[b]]
    assert len(terms) == (8 - 3) + (8 - 6)
    assert torch.allclose(loss, torch.stack(terms).mean(), rtol=1e-6)
    # predictions of prefix targets (t < M) do not matter at all
    moved = pred.clone()
    moved[0, :2] += 100.0  # targets 1, 2 of sample 0 (M = 3)
    moved[1, :5] -= 100.0  # targets 1..5 of sample 1 (M = 6)
    assert torch.equal(pixel_loss(moved, patches, pl), loss)
    moved[0, 2] += 1.0  # target 3 of sample 0 counts
    assert pixel_loss(moved, patches, pl) > loss


def test_normalized_targets_ignore_patch_brightness_and_contrast():
    p = torch.randn(4, 588)
    assert torch.allclose(normalize_patches(p * 5 + 7), normalize_patches(p), atol=1e-5)
    z = normalize_patches(p)
    assert torch.allclose(z.mean(-1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z.var(-1), torch.ones(4), atol=1e-4)


def test_text_loss_ignores_pad_and_averages_over_real_tokens():
    logits = torch.randn(2, 5, 11)
    tokens = torch.tensor([[4, 5, 6, 0, 0], [7, 0, 0, 0, 0]])
    loss = text_loss(logits, tokens, pad_id=0)
    real = tokens != 0
    expected = F.cross_entropy(logits[real], tokens[real])
    assert torch.allclose(loss, expected)
    moved = logits.clone()
    moved[~real] += torch.randn_like(moved[~real]) * 10
    assert torch.equal(text_loss(moved, tokens, 0), loss)
    assert text_loss(logits, torch.zeros(2, 5, dtype=torch.long), 0) == 0  # all pad: 0, not nan


def test_training_loss_combines_parts_with_alpha_and_is_reproducible():
    model = _tiny_model().train()
    x = torch.randn(3, 3, 56, 56)
    tokens = torch.randint(3, 512, (3, 77))
    tokens[:, 30:] = 0
    loss, parts = model.training_loss(x, None, tokens, pad_id=0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(loss, parts["loss_text"] + 0.4 * parts["loss_img"])
    assert parts["prefix_len"].shape == (3,) and 1 <= parts["prefix_len"].min() <= parts["prefix_len"].max() <= 15
    loss2, parts2 = model.training_loss(x, None, tokens, 0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(parts["prefix_len"], parts2["prefix_len"]) and torch.equal(loss, loss2)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # image-only batches (tokens None) train the pixel objective alone
    loss_img_only, parts3 = model.training_loss(x, None, None, 0, prefix_len=parts["prefix_len"])
    assert parts3["loss_text"] == 0 and torch.allclose(loss_img_only, 0.4 * parts["loss_img"])


def test_training_loss_rejects_mismatched_patches():
    model = _tiny_model()
    x = torch.randn(2, 3, 56, 56)
    with pytest.raises(ValueError, match="do not match images"):
        model.training_loss(x, torch.randn(2, 15, 588), None, 0)


def test_training_loss_normalises_uint8_batches_on_their_device():
    """Issue 22 point 1: a Batch's uint8 images and patches (channels-last, as the decoders fill them) give
    the loss of the CLIP-normalised float32 pixels the loader used to hand over."""
    from aimv2data.batch import empty_images, normalize, patchify

    model = _tiny_model().train()
    u8 = empty_images(3, 56, 56)
    u8.copy_(torch.randint(0, 256, (3, 3, 56, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)))
    tokens = torch.randint(3, 512, (3, 77))
    prefix = torch.tensor([1, 7, 15])
    x = normalize(u8)
    ref, ref_parts = model.training_loss(x, patchify(x, P), tokens, 0, prefix_len=prefix)
    for patches in (patchify(u8, P), None):                     # Batch.patches (uint8), or cut in the model
        loss, parts = model.training_loss(u8, patches, tokens, 0, prefix_len=prefix)
        assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-6)
        assert torch.allclose(parts["loss_img"], ref_parts["loss_img"], rtol=1e-6, atol=1e-6)
