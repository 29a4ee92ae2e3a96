"""SIFT-semantic interrelation: patch weights, groups, lifts (known answers), flags, prompting
and the keypoint-guided masking sampler."""
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vitfree
from vitfree import WindowSpec
from vitfree.analysis.inputs import model_transform, to_display_image
from vitfree.analysis.semantic import (Keypoints, block_lifts, concentration_groups, detect_keypoints,
                                       keypoint_guided_masks, keypoint_patch_mass, prompting, semantic_image,
                                       semantic_interrelation, visible_probabilities)
from vitfree.demo import bundled_images

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10)


@pytest.fixture(scope='module')
def winft():
    torch.manual_seed(0)
    spec = WindowSpec(8, [1, 2, None], {'kind': 'uniform'})
    return vitfree.create_winft('vit_tiny_patch16_224', windows=spec, **TINY).eval()


def photos(model):
    tf = model_transform(model)
    return torch.stack([tf(Image.open(p).convert('RGB')) for p in bundled_images()])


# ---- weights and groups ------------------------------------------------------------------------------
def test_patch_mass_by_hand():
    kp = Keypoints.from_arrays(x=[1, 5, 6, 2, 8], y=[1, 1, 2, 7, 8], size=[2, 2, 2, 2, 2],
                               response=[0.1, 0.2, 0.3, 0.4, 0.5])
    counts, mass = keypoint_patch_mass(kp, (8, 8), (2, 2), 'count')
    assert counts.tolist() == [1, 2, 1, 1] and mass.tolist() == [1, 2, 1, 1]  # (8, 8) sits on the border: patch 3
    _, mass = keypoint_patch_mass(kp, (8, 8), (2, 2), 'response')
    assert np.allclose(mass, [0.1, 0.5, 0.4, 0.5])
    _, mass = keypoint_patch_mass(kp, (8, 8), (2, 2), 'scale')
    assert mass.sum() == pytest.approx(5.0)  # one unit per keypoint, inside the image


def test_scale_weight_spreads_by_keypoint_size():
    tiny = Keypoints.from_arrays(x=[2.0], y=[6.0], size=[0.02])
    _, mass = keypoint_patch_mass(tiny, (8, 8), (2, 2), 'scale')
    assert np.allclose(mass, [0, 0, 1, 0], atol=1e-9)
    centred = Keypoints.from_arrays(x=[4.0], y=[4.0], size=[4.0])
    _, mass = keypoint_patch_mass(centred, (8, 8), (2, 2), 'scale')
    assert np.allclose(mass, 0.25)


def test_concentration_groups_by_tertiles():
    counts = np.array([0, 0, 1, 2, 3, 4, 5, 6])
    assert concentration_groups(counts, counts).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # mass from another weighting: group 0 still follows the keypoint count
    mass = np.array([0.3, 0.2, 1, 2, 3, 4, 5, 6])
    assert concentration_groups(counts, mass).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match='two increasing numbers'):
        concentration_groups(counts, counts, (0.7, 0.3))


@pytest.mark.parametrize('weight', ['count', 'response', 'scale'])
def test_weights_sum_to_one_and_group0_is_exactly_the_keypoint_free_patches(weight):
    img = np.asarray(Image.open(bundled_images()[0]).convert('RGB'))
    s = semantic_image(img, (14, 14), weight)
    assert len(s.keypoints) > 50
    assert s.weights.sum() == pytest.approx(1.0) and np.all(s.weights >= 0)
    # count the keypoints per 16x16 patch independently, from OpenCV's own keypoints
    import cv2
    kps = cv2.SIFT_create().detect(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), None)
    hits = np.zeros((14, 14), int)
    for k in kps:
        hits[min(int(k.pt[1] // 16), 13), min(int(k.pt[0] // 16), 13)] += 1
    assert np.array_equal(s.counts.reshape(14, 14), hits)
    assert np.array_equal(s.groups == 0, hits.reshape(-1) == 0)
    assert set(np.unique(s.groups[s.groups > 0])) <= {1, 2, 3}
    # higher groups hold higher mass
    for lo, hi in ((1, 2), (2, 3)):
        if (s.groups == lo).any() and (s.groups == hi).any():
            assert s.mass[s.groups == lo].max() < s.mass[s.groups == hi].min()


def test_image_without_keypoints_has_zero_weights():
    s = semantic_image(np.full((32, 32, 3), 128, np.uint8), (4, 4))
    assert len(s.keypoints) == 0 and s.weights.sum() == 0 and np.all(s.groups == 0)


def test_sift_runs_on_the_image_as_the_model_sees_it(winft):
    """After the model's resize and crop, before normalisation."""
    x = photos(winft)
    res = semantic_interrelation(winft, x[:1], progress=False)
    tf = model_transform(winft)
    geometric = [t for t in tf.transforms if type(t).__name__ not in ('ToTensor', 'MaybeToTensor', 'Normalize')]
    img = Image.open(bundled_images()[0]).convert('RGB')
    for t in geometric:
        img = t(img)
    seen = np.asarray(img)
    assert res.images[0].image.shape == seen.shape == (32, 32, 3)
    assert np.abs(res.images[0].image.astype(int) - seen.astype(int)).max() <= 1
    assert len(res.images[0].keypoints) == len(detect_keypoints(res.images[0].image))


# ---- lifts on hand-built attention ---------------------------------------------------------------------
def attention_on(targets_per_query, tokens):
    a = torch.zeros(1, 1, tokens, tokens)
    for q, row in enumerate(targets_per_query):
        for k, v in row.items():
            a[0, 0, q, k] = v
    return a


def test_uniform_attention_has_lift_one():
    p, n = 1, 4
    a = torch.full((2, 3, p + n, p + n), 1 / (p + n))
    w = torch.tensor([[0.5, 0.5, 0, 0], [0.1, 0.2, 0.3, 0.4]])
    g = torch.tensor([[3, 3, 0, 0], [1, 1, 2, 3]])
    out = block_lifts(a, w, g, p, cls_index=0)
    assert torch.allclose(out['query_lift'], torch.ones(2, 3))
    gl = out['group_lift']
    assert torch.allclose(gl[~torch.isnan(gl)], torch.ones(1))
    assert torch.isnan(gl[0, :, 1]).all() and torch.isnan(gl[0, :, :, 1]).all()  # group 1 empty in image 0
    cl = out['cls_lift']
    assert torch.allclose(cl[0][:, [0, 3]], torch.ones(3, 2)) and torch.isnan(cl[0][:, 1:3]).all()
    assert torch.allclose(cl[1][:, 1:], torch.ones(3, 3)) and torch.isnan(cl[1][:, 0]).all()  # no group 0


def test_attention_on_the_semantic_patch_by_hand():
    """Every query (and the class token) splits its attention between the class token and
    patch 0, which carries half the semantic weight: query lift w_0 / mean(w) = 2."""
    p = 1
    rows = [{0: 0.5, 1: 0.5}] * 5
    a = attention_on(rows, 5)
    w = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    g = torch.tensor([[3, 3, 0, 0]])
    out = block_lifts(a, w, g, p, cls_index=0)
    assert out['query_lift'].item() == pytest.approx(2.0)
    assert torch.allclose(out['query_lift_map'][0, 0], torch.full((4,), 2.0))
    gl = out['group_lift'][0, 0]
    assert gl[0, 3].item() == pytest.approx(2.0) and gl[3, 3].item() == pytest.approx(2.0)
    assert gl[0, 0].item() == 0.0 and gl[3, 0].item() == 0.0
    assert torch.allclose(out['cls_mass'][0, 0], torch.tensor([0.0, 0, 0, 1]))
    assert out['cls_lift'][0, 0, 3].item() == pytest.approx(2.0) and out['cls_lift'][0, 0, 0].item() == 0


def test_windows_alone_give_no_lift():
    """Each query may only see itself and attends to itself: against uniform attention over
    the same (one) key that is no preference at all."""
    n = 4
    a = torch.eye(n)[None, None]
    w = torch.tensor([[0.7, 0.3, 0.0, 0.0]])
    g = torch.tensor([[3, 1, 0, 0]])
    out = block_lifts(a, w, g, 0, allowed=torch.eye(n, dtype=torch.bool))
    assert out['query_lift'].item() == pytest.approx(1.0)  # queries 2, 3 see no weight: left out
    assert torch.isnan(out['query_lift_map'][0, 0, 2:]).all()
    gl = out['group_lift'][0, 0]
    assert gl[3, 3].item() == pytest.approx(1.0) and gl[1, 1].item() == pytest.approx(1.0)
    assert gl[0, 0].item() == pytest.approx(1.0)
    # without the window, the same attention looks like a strong preference for oneself
    assert block_lifts(a, w, g, 0)['group_lift'][0, 0, 3, 3].item() == pytest.approx(4.0)


# ---- on models ------------------------------------------------------------------------------------------
def test_semantic_interrelation_on_a_vit_with_registers():
    model = timm.create_model('vit_tiny_patch16_224', img_size=64, patch_size=8, depth=2, reg_tokens=2,
                              num_classes=5).eval()
    x = photos(model)
    res = semantic_interrelation(model, x, weight='response', progress=False, names=['a', 'b'])
    assert res.query_lift.shape == (2, 2, 3) and res.group_lift.shape == (2, 2, 3, 4, 4)
    assert res.cls_lift.shape == (2, 2, 3, 4) and res.query_lift_map.shape == (2, 2, 64)
    assert np.allclose(res.cls_mass.sum(-1), 1, atol=1e-5)
    assert res.flag_block == 1 and res.mean_group_lift().shape == (2, 4, 4)
    g0 = res.group0_mass()
    assert np.all(res.flags(threshold=0.0) == (g0 > 0)) and not res.flags(threshold=1.0).any()
    flagged = res.flagged_by_class(threshold=0.0)
    assert sorted(sum(flagged.values(), [])) == sorted(np.array(['a', 'b'])[g0 > 0].tolist())
    import json
    json.dumps(res.to_dict())


def test_model_without_class_token_has_no_flags():
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, class_token=False,
                              global_pool='avg', num_classes=3).eval()
    res = semantic_interrelation(model, photos(model), progress=False)
    assert res.cls_lift is None and res.group0_mass() is None and not res.flags().any()


def test_prompting_masks_group0_and_as_many_random_patches(winft):
    x = photos(winft)
    pr = prompting(winft, x, progress=False, repeats=2)
    expected = [int((semantic_image(to_display_image(img, winft), (8, 8)).groups == 0).sum()) for img in x]
    assert pr.masked.tolist() == expected
    s = pr.summary()
    assert set(s) == {'semantic', 'random', 'mean_masked'} and 0 <= s['random']['changed'] <= 1
    # masking nothing changes nothing
    none = prompting(winft, x, by='lowest', fraction=0.0, progress=False)
    assert none.masked.tolist() == [0, 0]
    assert np.array_equal(none.sem_pred, none.base_pred) and np.allclose(none.sem_conf, none.base_conf, atol=1e-5)
    assert np.all(none.rand_changed == 0)
    low = prompting(winft, x, by='lowest', fraction=0.5, progress=False)
    assert low.masked.tolist() == [32, 32]


# ---- keypoint-guided masking -----------------------------------------------------------------------------
MASS = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 5, 5, 8, 8, 0, 0], dtype=float)


def test_visible_probabilities_are_proportional_to_the_tempered_mass():
    k = 4  # 16 patches, mask ratio 0.75
    pi = visible_probabilities(MASS, 0.75, temperature=0.0)[0]
    assert torch.allclose(pi, torch.full((16,), 0.25, dtype=torch.float64))
    pi = visible_probabilities(MASS, 0.75, temperature=1.0, eps=1.0)[0]
    q = torch.as_tensor(MASS + 1.0)
    assert torch.allclose(pi, k * q / q.sum())  # 4 * 9 / 54 < 1: nothing capped
    # a steep temperature caps the top patches at 1 and shares the rest in the same proportions
    pi = visible_probabilities(MASS, 0.75, temperature=3.0, eps=1.0)[0]
    assert pi.sum().item() == pytest.approx(k) and pi.max().item() == pytest.approx(1.0)
    free = pi < 1
    q3 = torch.as_tensor(MASS + 1.0) ** 3
    assert torch.allclose(pi[free] / pi[free].sum(), q3[free] / q3[free].sum())
    with pytest.raises(ValueError, match='mask_ratio must be in'):
        visible_probabilities(MASS, 1.5)


@pytest.mark.parametrize('temperature', [0.0, 1.0, 2.0])
def test_sampler_visible_frequencies_follow_the_temperature(temperature):
    draws = 4000
    gen = torch.Generator().manual_seed(1234)
    mass = np.repeat(MASS[None], draws, 0)
    masked = keypoint_guided_masks(mass, mask_ratio=0.75, temperature=temperature, eps=1.0, generator=gen)
    assert masked.shape == (draws, 16) and masked.dtype == torch.bool
    assert torch.all((~masked).sum(1) == 4)  # exactly the mask ratio, every time
    freq = (~masked).double().mean(0)
    expected = visible_probabilities(MASS, 0.75, temperature, 1.0)[0]
    sd = torch.sqrt(expected * (1 - expected) / draws).clamp_min(1e-3)
    assert torch.all((freq - expected).abs() < 4.5 * sd)
    # and the test can tell temperatures apart: every other temperature is far outside the band
    for other in {0.0, 1.0, 2.0} - {temperature}:
        alt = visible_probabilities(MASS, 0.75, other, 1.0)[0]
        assert ((freq - alt).abs() / sd).max() > 10
    if temperature == 0.0:
        assert torch.all((freq - 0.25).abs() < 4.5 * math.sqrt(0.25 * 0.75 / draws))


def test_sampler_is_reproducible_and_batched():
    a = keypoint_guided_masks(MASS, generator=torch.Generator().manual_seed(5))
    b = keypoint_guided_masks(MASS, generator=torch.Generator().manual_seed(5))
    assert a.shape == (1, 16) and torch.equal(a, b)
    many = keypoint_guided_masks(np.stack([MASS, MASS[::-1]]), mask_ratio=0.5,
                                 generator=torch.Generator().manual_seed(0))
    assert many.shape == (2, 16) and torch.all(many.sum(1) == 8)
    assert keypoint_guided_masks(MASS, mask_ratio=1.0).all()
    with pytest.raises(ValueError, match='non-negative'):
        keypoint_guided_masks(-MASS)
