"""Hop-distance strengths and head entropy (known answers on hand-built attention, and on models
whose windows force the answer)."""
import math

import numpy as np
import pytest
import timm
import torch

import vitfree
from vitfree import WindowSpec
from vitfree.analysis.profiles import AVERAGES, distance_profiles, head_entropy, hop_distances, hop_strength

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10)


def uniform_attention(tokens: int, lead=(2, 3)) -> torch.Tensor:
    return torch.full((*lead, tokens, tokens), 1.0 / tokens)


def identity_attention(tokens: int, lead=(2, 3)) -> torch.Tensor:
    return torch.eye(tokens).expand(*lead, tokens, tokens).clone()


def test_hop_distances_are_chebyshev():
    d = hop_distances((2, 3))
    # patches row-major: (0,0) (0,1) (0,2) / (1,0) (1,1) (1,2)
    assert d[0].tolist() == [0, 1, 2, 1, 1, 2]
    assert d[4].tolist() == [1, 1, 1, 1, 0, 1]
    assert torch.equal(d, d.T)
    with pytest.raises(ValueError, match='grid must be'):
        hop_distances((0, 3))


@pytest.mark.parametrize('average', AVERAGES)
@pytest.mark.parametrize('prefix', [0, 1, 3])
def test_identity_attention_is_hop0_with_entropy_zero(average, prefix):
    grid = (4, 5)
    a = identity_attention(prefix + 20)
    s = hop_strength(a, grid, prefix, average)
    assert s.shape == (2, 3, 5)  # hops 0 .. max(H, W) - 1
    assert torch.allclose(s[..., 0], torch.ones(2, 3))
    assert torch.all(s[..., 1:] == 0)
    ent = head_entropy(s)
    assert torch.all(ent == 0) and not torch.signbit(ent).any()


@pytest.mark.parametrize('average', AVERAGES)
@pytest.mark.parametrize('grid', [(4, 4), (3, 5), (6, 2)])
def test_uniform_attention_has_maximal_entropy(average, grid):
    """Uniform attention (over all T tokens, prefix included) has the same mean at every hop,
    so the hop distribution is uniform and H = ln(max(H, W)) exactly."""
    prefix = 2
    n = grid[0] * grid[1]
    s = hop_strength(uniform_attention(prefix + n), grid, prefix, average)
    assert torch.allclose(s, torch.full_like(s, 1.0 / (prefix + n)))
    assert torch.allclose(head_entropy(s), torch.full((2, 3), math.log(max(grid))), atol=1e-6)


def test_summing_instead_of_averaging_would_not_be_uniform():
    """Why the mean matters: far hops have fewer pairs, so summed attention falls with distance."""
    grid, n = (3, 5), 15
    a = uniform_attention(n, lead=())
    d = hop_distances(grid)
    summed = torch.stack([a[d == k].sum() for k in range(5)])
    assert head_entropy(summed) < math.log(5) - 0.05
    assert torch.allclose(hop_strength(a, grid), torch.stack([a[d == k].mean() for k in range(5)]))


def test_pairs_and_queries_averages_differ_as_computed_by_hand():
    # a 1x3 grid: the ends look at the middle, the middle splits between the ends
    a = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    pairs = hop_strength(a, (1, 3), average='pairs')
    queries = hop_strength(a, (1, 3), average='queries')
    # hop 1 pairs: (0,1)=1, (1,0)=.5, (1,2)=.5, (2,1)=1 -> mean .75; per query: 1, .5, 1 -> 5/6
    assert torch.allclose(pairs, torch.tensor([0.0, 0.75, 0.0]))
    assert torch.allclose(queries, torch.tensor([0.0, 5 / 6, 0.0]))


def test_entropy_of_two_equal_hops_and_of_nothing():
    assert torch.allclose(head_entropy(torch.tensor([0.3, 0.3, 0.0])), torch.tensor(math.log(2)))
    assert torch.isnan(head_entropy(torch.zeros(4)))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="average must be one of"):
        hop_strength(torch.eye(4), (2, 2), average='keys')
    with pytest.raises(ValueError, match=r'does not fit 1 prefix tokens and a 2x2 grid'):
        hop_strength(torch.eye(4), (2, 2), num_prefix_tokens=1)


def winft(radius_first_block: int):
    spec = WindowSpec(8, [radius_first_block, 1, None], {'kind': 'uniform'})
    return vitfree.create_winft('vit_tiny_patch16_224', windows=spec, **TINY).eval()


def test_windows_force_the_profile_of_a_real_model():
    """Window radius 0 in block 0: each patch only sees itself (and the class token), so every
    head of block 0 has entropy 0; radius 1 in block 1: nothing beyond hop 1."""
    model = winft(0)
    x = torch.randn(3, 3, 32, 32)
    prof = distance_profiles(model, x, progress=False)
    assert prof.strength.shape == (3, 3, 3, 8) and prof.entropy.shape == (3, 3, 3)
    assert prof.blocks == [0, 1, 2] and prof.grid == (8, 8) and prof.num_prefix_tokens == 1
    assert np.all(prof.entropy[:, 0] == 0)
    assert np.all(prof.strength[:, 1, :, 2:] == 0) and np.all(prof.strength[:, 1, :, :2] > 0)
    assert np.all(prof.entropy[:, 1] > 0) and np.all(prof.entropy[:, 1] <= math.log(2) + 1e-6)
    assert np.all(prof.strength[:, 2] > 0)  # the global block
    assert prof.mean_strength.shape == (3, 3, 8)
    assert np.allclose(prof.mean_entropy, prof.entropy.mean(0))
    assert prof.entropy_of_mean.shape == (3, 3)
    assert np.allclose(prof.hop_distribution().sum(-1), 1.0)
    d = prof.to_dict()
    assert d['max_entropy'] == pytest.approx(math.log(8)) and len(d['mean_entropy']) == 3


def test_profiles_match_recorded_attention_on_a_plain_vit_with_registers():
    model = timm.create_model('vit_tiny_patch16_224', img_size=64, depth=2, reg_tokens=2, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    prof = distance_profiles(model, x, blocks=[-1], average='queries', progress=False, batch_size=1)
    with vitfree.record(model, blocks=[1]) as rec, torch.no_grad():
        model(x)
    expected = hop_strength(rec.attention[1], (4, 4), 3, 'queries')
    assert prof.blocks == [1]
    assert np.allclose(prof.strength[:, 0], expected.numpy(), atol=1e-6)
