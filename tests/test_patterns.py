"""Attention-pattern descriptors, the autoencoder, clustering and its reproducibility."""
import numpy as np
import pytest
import timm
import torch

import vitfree
from vitfree import WindowSpec
from vitfree.analysis.patterns import PatternDescriptors, attention_patterns, pattern_descriptors

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10)


def test_descriptors_of_a_winft():
    spec = WindowSpec(8, [0, 1, None], {'kind': 'uniform'})
    model = vitfree.create_winft('vit_tiny_patch16_224', windows=spec, **TINY).eval()
    d = pattern_descriptors(model, torch.randn(2, 3, 32, 32), progress=False)
    assert len(d) == 2 * 3 * 3 and d.source == 'class token' and d.grid == (8, 8)
    assert d.cls_map.shape == (18, 8, 8) and d.hop.shape == (18, 8)
    assert np.allclose(d.cls_map.sum((1, 2)), 1, atol=1e-5) and np.allclose(d.hop.sum(1), 1, atol=1e-5)
    # sample order is (image, block, head); block 0 has radius-0 windows: all strength at hop 0
    assert d.index[:4].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0]]
    assert np.allclose(d.hop[d.index[:, 1] == 0, 0], 1.0)
    assert d.matrix().shape == (18, 64 + 8) and d.dim == 72
    maps, hops = d.split(d.matrix())
    assert np.allclose(maps, d.cls_map, atol=1e-6) and np.allclose(hops, d.hop, atol=1e-6)


def test_descriptors_without_class_token_use_the_patch_mean():
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, class_token=False,
                              global_pool='avg', num_classes=3).eval()
    d = pattern_descriptors(model, torch.randn(1, 3, 32, 32), blocks=[1], progress=False)
    assert d.source == 'patch mean' and len(d) == 3 and d.blocks == [1]
    assert np.allclose(d.cls_map.sum((1, 2)), 1, atol=1e-5)


def two_kinds(n_per_kind=20, seed=0):
    """Local heads (all attention at hop 0, class token on one corner) and global heads
    (uniform everywhere), with a little noise."""
    rng = np.random.default_rng(seed)
    grid, hops = (4, 4), 4
    local_map = np.full(grid, 0.01)
    local_map[0, 0] = 1.0
    local_map /= local_map.sum()
    maps = np.concatenate([np.repeat(local_map[None], n_per_kind, 0),
                           np.full((n_per_kind, *grid), 1 / 16)])
    hop = np.concatenate([np.repeat([[1.0, 0, 0, 0]], n_per_kind, 0), np.full((n_per_kind, hops), 0.25)])
    maps = np.abs(maps + rng.normal(0, 0.003, maps.shape))
    hop = np.abs(hop + rng.normal(0, 0.01, hop.shape))
    maps /= maps.sum((1, 2), keepdims=True)
    hop /= hop.sum(1, keepdims=True)
    # index: image i, block 0 for the local kind and block 1 for the global kind, head = i % 2
    idx = np.array([[i % n_per_kind, 0 if i < n_per_kind else 1, i % 2] for i in range(2 * n_per_kind)])
    kind = np.repeat([0, 1], n_per_kind)
    return PatternDescriptors(maps.astype(np.float32), hop.astype(np.float32), idx, [0, 1], 2, grid), kind


def test_clusters_recover_the_two_kinds_of_head():
    d, kind = two_kinds()
    pat = attention_patterns(d, latent_dim=4, k=2, epochs=60, seed=3)
    assert pat.latents.shape == (40, 4) and pat.coords.shape == (40, 2)
    # the clustering is the partition by kind (cluster ids are arbitrary)
    assert len(set(zip(pat.labels.tolist(), kind.tolist()))) == 2
    local_cluster = pat.labels[0]
    assert pat.mean_hop[local_cluster, 0] > 0.9
    assert np.allclose(pat.mean_hop[1 - local_cluster], 0.25, atol=0.03)
    assert pat.mean_cls_map[local_cluster].argmax() == 0
    # per head: block 0 heads are local, block 1 heads global
    assert np.all(pat.head_cluster[0] == local_cluster) and np.all(pat.head_cluster[1] == 1 - local_cluster)
    assert np.allclose(pat.head_share.sum(-1), 1)
    assert pat.loss[-1] < pat.loss[0]
    assert pat.to_dict()['cluster_sizes'] == [20, 20]


def test_same_seed_same_result_and_global_rng_untouched():
    d, _ = two_kinds(seed=1)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = attention_patterns(d, latent_dim=3, k=3, epochs=20, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = attention_patterns(d, latent_dim=3, k=3, epochs=20, seed=7)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.coords, b.coords)
    assert np.array_equal(a.latents, b.latents) and a.loss == b.loss
    c = attention_patterns(d, latent_dim=3, k=3, epochs=20, seed=8)
    assert not np.array_equal(a.latents, c.latents)
    # cluster ids are ordered by size, largest first
    sizes = a.cluster_sizes()
    assert list(sizes) == sorted(sizes, reverse=True)


def test_bad_parameters_are_named():
    d, _ = two_kinds(n_per_kind=2)
    with pytest.raises(ValueError, match=r'k must be between 1 and the number of descriptors \(4\), got 6'):
        attention_patterns(d, k=6)
    with pytest.raises(ValueError, match='latent_dim must be >= 2'):
        attention_patterns(d, latent_dim=1, k=2)
