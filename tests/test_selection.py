"""weights -> flat indices: the sampler for an int K and the duplicate check, in both regimes."""
import pytest
import torch

from weightablate.selection import select_weights

SHAPE = (300, 200)  # 60,000 weights: K = 5 is sparse (drawn with rejection), K = 20,000 dense (randperm)


@pytest.mark.parametrize("k", [1, 5, 937, 14_999, 15_001, 20_000, 60_000])
def test_int_k_is_distinct_sorted_in_range_and_seeded(k):
    a = select_weights(k, SHAPE, seed=7)
    assert a.dtype == torch.int64 and a.numel() == k
    assert (a[1:] > a[:-1]).all() and a[0] >= 0 and a[-1] < 60_000
    assert torch.equal(a, select_weights(k, SHAPE, seed=7))
    if k < 60_000:
        assert not torch.equal(a, select_weights(k, SHAPE, seed=8))


@pytest.mark.parametrize("numel,k", [(12, 2), (400, 3)])
def test_int_k_is_uniform(numel, k):
    """Every index is drawn about equally often over many seeds (both regimes; deterministic)."""
    counts = torch.zeros(numel)
    runs = 3000
    for seed in range(runs):
        counts[select_weights(k, (1, numel), seed)] += 1
    expected = runs * k / numel
    # binomial sd = sqrt(expected): 6 sd is never reached by a fair sampler, a biased one misses it
    assert (counts - expected).abs().max() <= 6 * expected ** 0.5, counts
    if numel == 12:  # every pair of indices too (66 subsets, ~45 draws each)
        pairs = torch.zeros(numel, numel)
        for seed in range(runs):
            i, j = select_weights(k, (1, numel), seed).tolist()
            pairs[i, j] += 1
        assert pairs[torch.ones(numel, numel, dtype=torch.bool).triu(1)].min() > 0


@pytest.mark.parametrize("n", [3, 50_000])  # sort-and-compare and mask checks
def test_duplicates_are_found_for_few_and_many_indices(n):
    flat = torch.randperm(60_000, generator=torch.Generator().manual_seed(0))[:n]
    assert torch.equal(select_weights(flat, SHAPE, 0), flat)
    dup = flat.clone()
    dup[-1] = dup[0]
    with pytest.raises(ValueError, match="duplicate"):
        select_weights(dup, SHAPE, 0)
