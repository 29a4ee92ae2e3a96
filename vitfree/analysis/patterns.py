"""Attention patterns: what kinds of heads a model has.

Each (image, block, head) is summarised by a fixed-size *descriptor* made of two parts:

* where the class token looks: its attention over the ``H x W`` patch grid, rescaled to sum
  to one over the patches (models without a class token use the mean attention each patch
  receives from all patch queries instead);
* how far the head looks: its hop distribution ``p_n`` (see :mod:`vitfree.analysis.profiles`).

Both parts are scaled so that uniform attention gives ones, and divided by the square root
of their length, so each part weighs about the same in the descriptor's norm however large
the grid.  A small autoencoder (an MLP, ``latent_dim`` wide in the middle) learns to compress
the descriptors; the latents are clustered with k-means and projected to 2-D with PCA for a
map.  Every step is seeded: the same descriptors and seed give the same clusters.

    desc = pattern_descriptors(model, images)
    pat = attention_patterns(desc, latent_dim=16, k=6, seed=0)
    pat.head_cluster       # (blocks, heads): each head's most frequent cluster over images
    pat.coords             # (samples, 2) the map; pat.labels the cluster of each sample
    pat.mean_cls_map, pat.mean_hop   # one mean descriptor per cluster
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .capture import attention_modules, attention_pass, class_token_index, normalize_blocks, num_prefix_tokens
from .inputs import ImagesLike, progress_bar
from .profiles import hop_strength

__all__ = ['PatternDescriptors', 'AttentionPatterns', 'PatternAutoencoder', 'pattern_descriptors',
           'attention_patterns']


@dataclass
class PatternDescriptors:
    """Descriptors of ``S`` (image, block, head) samples.

    ``cls_map[s]`` is an ``(H, W)`` distribution over patches, ``hop[s]`` a distribution over
    hops, ``index[s] = (image, block, head)``; ``source`` says whether ``cls_map`` comes from
    the class token (``'class token'``) or from the mean over patch queries (``'patch mean'``).
    """
    cls_map: np.ndarray
    hop: np.ndarray
    index: np.ndarray
    blocks: List[int]
    num_heads: int
    grid: Tuple[int, int]
    source: str = 'class token'

    def __len__(self) -> int:
        return int(self.cls_map.shape[0])

    @property
    def num_images(self) -> int:
        return int(self.index[:, 0].max()) + 1 if len(self) else 0

    @property
    def dim(self) -> int:
        return int(self.cls_map[0].size + self.hop.shape[1])

    def matrix(self) -> np.ndarray:
        """``(S, D)`` float32 feature matrix fed to the autoencoder (module docstring)."""
        n, hops = self.cls_map[0].size, self.hop.shape[1]
        a = self.cls_map.reshape(len(self), n) * n / np.sqrt(n)
        b = self.hop * hops / np.sqrt(hops)
        return np.concatenate([a, b], 1).astype(np.float32)

    def split(self, features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Undo :meth:`matrix`: ``(K, D)`` features -> ``(K, H, W)`` maps and ``(K, hops)`` profiles."""
        n, hops = self.cls_map[0].size, self.hop.shape[1]
        maps = features[:, :n] * np.sqrt(n) / n
        return maps.reshape(-1, *self.grid), features[:, n:] * np.sqrt(hops) / hops


def pattern_descriptors(
        model: nn.Module,
        images: ImagesLike,
        blocks: Optional[Iterable[int]] = None,
        average: str = 'pairs',
        *,
        num_images: Optional[int] = None,
        batch_size: int = 16,
        device: Union[str, torch.device, None] = None,
        progress: bool = True,
) -> PatternDescriptors:
    """One descriptor per (image, block, head) of any timm ViT-family model (module docstring);
    ``average`` is the hop averaging of :func:`vitfree.analysis.profiles.hop_strength`."""
    depth = len(attention_modules(model))
    chosen = normalize_blocks(blocks, depth)
    npt = num_prefix_tokens(model)
    cls = class_token_index(model)
    maps: Dict[int, List[torch.Tensor]] = {b: [] for b in chosen}
    hops: Dict[int, List[torch.Tensor]] = {b: [] for b in chosen}
    grids: List[Tuple[int, int]] = []

    def on_probs(block, probs, x, grid):
        if block == chosen[0]:
            if grids and tuple(grid) != grids[0]:
                raise ValueError(f'all images must give one patch grid, got {tuple(grid)} after {grids[0]}')
            grids.append(tuple(grid))
        p = probs.float()
        if cls is not None:
            m = p[:, :, cls, npt:]
        else:
            m = p[:, :, npt:, npt:].mean(2)
        m = m / m.sum(-1, keepdim=True).clamp_min(1e-30)
        maps[block].append(m.cpu())
        s = hop_strength(p, grid, npt, average)
        hops[block].append((s / s.sum(-1, keepdim=True).clamp_min(1e-30)).cpu())

    attention_pass(model, images, on_probs, chosen, num_images=num_images, batch_size=batch_size, device=device,
                   progress=progress, desc='pattern descriptors')
    m = torch.stack([torch.cat(maps[b]) for b in chosen], 1)  # (I, L, h, N)
    s = torch.stack([torch.cat(hops[b]) for b in chosen], 1)  # (I, L, h, hops)
    n_img, n_blk, n_head = m.shape[:3]
    idx = np.stack(np.meshgrid(np.arange(n_img), np.asarray(chosen), np.arange(n_head), indexing='ij'), -1)
    return PatternDescriptors(
        cls_map=m.reshape(-1, *grids[0]).numpy(), hop=s.reshape(-1, s.shape[-1]).numpy(),
        index=idx.reshape(-1, 3), blocks=chosen, num_heads=n_head, grid=grids[0],
        source='class token' if cls is not None else 'patch mean',
    )


class PatternAutoencoder(nn.Module):
    """A two-layer MLP encoder and decoder: ``D -> hidden -> latent_dim -> hidden -> D``."""

    def __init__(self, dim: int, latent_dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return self.decoder(z), z


@dataclass
class AttentionPatterns:
    """Clusters of attention patterns.

    ``latents`` ``(S, latent_dim)``, ``coords`` ``(S, 2)`` PCA of the latents, ``labels``
    ``(S,)`` k-means cluster of each sample; ``mean_cls_map`` ``(k, H, W)`` and ``mean_hop``
    ``(k, hops)`` the mean descriptor of each cluster; ``head_cluster`` ``(blocks, heads)`` each
    head's most frequent cluster over the images and ``head_share`` ``(blocks, heads, k)`` how
    often it falls in each cluster; ``loss`` the autoencoder's training loss per epoch.
    """
    descriptors: PatternDescriptors
    latents: np.ndarray
    coords: np.ndarray
    labels: np.ndarray
    mean_cls_map: np.ndarray
    mean_hop: np.ndarray
    head_cluster: np.ndarray
    head_share: np.ndarray
    loss: List[float]
    explained_variance: np.ndarray
    k: int
    seed: int
    meta: Dict[str, object] = field(default_factory=dict)

    def cluster_sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)

    def to_dict(self) -> Dict[str, object]:
        """Per-head clusters and cluster summaries as plain Python (for JSON)."""
        return {
            'k': self.k, 'seed': self.seed, 'blocks': self.descriptors.blocks,
            'num_samples': len(self.descriptors), 'source': self.descriptors.source,
            'head_cluster': self.head_cluster.tolist(), 'cluster_sizes': self.cluster_sizes().tolist(),
            'mean_hop': np.round(self.mean_hop, 6).tolist(),
            'final_loss': float(self.loss[-1]) if self.loss else None,
            'explained_variance': np.round(self.explained_variance, 6).tolist(),
        }


def attention_patterns(
        descriptors: PatternDescriptors,
        latent_dim: int = 16,
        k: int = 6,
        *,
        hidden: int = 64,
        epochs: int = 200,
        batch_size: int = 256,
        lr: float = 3e-3,
        seed: int = 0,
        progress: bool = False,
) -> AttentionPatterns:
    """Train the autoencoder on the descriptors, then cluster and map its latents.

    Args:
        descriptors: from :func:`pattern_descriptors`.
        latent_dim: width of the autoencoder's bottleneck (>= 2).
        k: number of k-means clusters (at most the number of samples).
        hidden: width of the hidden layers.
        epochs: passes over the descriptors (Adam, mean squared reconstruction error).
        batch_size: descriptors per step.
        lr: Adam learning rate.
        seed: seeds the initialisation, the shuffling, k-means and PCA; the global RNG state is
            left untouched.
        progress: show a progress bar over epochs.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    n = len(descriptors)
    if latent_dim < 2:
        raise ValueError(f'latent_dim must be >= 2 (the map is 2-D), got {latent_dim}')
    if not 1 <= k <= n:
        raise ValueError(f'k must be between 1 and the number of descriptors ({n}), got {k}')
    if epochs < 1 or batch_size < 1:
        raise ValueError(f'epochs and batch_size must be >= 1, got {epochs} and {batch_size}')
    x = torch.from_numpy(descriptors.matrix())
    mean = x.mean(0, keepdim=True)
    scale = (x - mean).std().clamp_min(1e-8)
    xn = (x - mean) / scale
    losses: List[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest (and reproducibly) on one thread
    try:
        z = _train(xn, latent_dim, hidden, epochs, batch_size, lr, seed, progress, losses)
    finally:
        torch.set_num_threads(threads)
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z) if k > 1 else np.zeros(n, int)
    labels = _relabel_by_size(labels, k)
    pca = PCA(n_components=2, svd_solver='full', random_state=seed)
    coords = pca.fit_transform(z) if n >= 2 else np.zeros((n, 2))
    explained = getattr(pca, 'explained_variance_ratio_', np.zeros(2))
    feats = descriptors.matrix()
    means = np.stack([feats[labels == c].mean(0) if (labels == c).any() else np.zeros(feats.shape[1], np.float32)
                      for c in range(k)])
    mean_maps, mean_hop = descriptors.split(means)
    blocks, nh = descriptors.blocks, descriptors.num_heads
    share = np.zeros((len(blocks), nh, k))
    pos = {b: i for i, b in enumerate(blocks)}
    for (_, b, h), c in zip(descriptors.index, labels):
        share[pos[int(b)], int(h), c] += 1
    share /= np.maximum(share.sum(-1, keepdims=True), 1)
    return AttentionPatterns(
        descriptors=descriptors, latents=z.astype(np.float32), coords=coords.astype(np.float32), labels=labels,
        mean_cls_map=mean_maps, mean_hop=mean_hop, head_cluster=share.argmax(-1), head_share=share, loss=losses,
        explained_variance=np.asarray(explained), k=k, seed=seed,
        meta={'latent_dim': latent_dim, 'hidden': hidden, 'epochs': epochs, 'lr': lr},
    )


def _train(xn: torch.Tensor, latent_dim: int, hidden: int, epochs: int, batch_size: int, lr: float, seed: int,
           progress: bool, losses: List[float]) -> np.ndarray:
    """Train a :class:`PatternAutoencoder` on ``xn`` (seeded, global RNG untouched); returns the
    latents and appends the mean loss of every epoch to ``losses``."""
    n = xn.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = PatternAutoencoder(xn.shape[1], latent_dim, hidden)
        opt = torch.optim.Adam(ae.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        bar = progress_bar(epochs, 'pattern autoencoder', progress, unit='epoch')
        try:
            with torch.enable_grad():
                for _ in range(epochs):
                    perm = torch.randperm(n, generator=gen)
                    total = 0.0
                    for s in range(0, n, batch_size):
                        xb = xn[perm[s:s + batch_size]]
                        rec, _ = ae(xb)
                        loss = (rec - xb).square().mean()
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        total += float(loss.detach()) * xb.shape[0]
                    losses.append(total / n)
                    bar.update(1)
        finally:
            bar.close()
        with torch.no_grad():
            z = ae.encoder(xn).numpy().astype(np.float64)
    return z


def _relabel_by_size(labels: np.ndarray, k: int) -> np.ndarray:
    """Renumber clusters from largest (0) to smallest, ties by first appearance, so cluster ids
    do not depend on k-means' internal order."""
    sizes = np.bincount(labels, minlength=k)
    first = np.array([np.argmax(labels == c) if sizes[c] else len(labels) for c in range(k)])
    order = sorted(range(k), key=lambda c: (-sizes[c], first[c]))
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    return remap[labels]
