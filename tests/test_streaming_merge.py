"""The streaming merge pass: chunking and threads never change a result, deterministic methods
equal their whole-tensor form bit for bit, and the counter-based DARE draws are independent
Bernoulli(p) masks (keep rate, independence across neighbours and experts)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from evomerge.workers.kernels import fused, selection, sparsify, streaming
from evomerge.workers.kernels.chunks import CHUNK, chunk_size
from evomerge.workers.registry import OPERATORS
from tests.helpers import merge_launches

BIG = 3 * CHUNK + 1001  # crosses chunk boundaries at 1 and 2 threads, odd length


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sources(dtype: torch.dtype, n: int = BIG, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    return base.to(dtype), [(base + 0.1 * torch.randn(n, generator=g)).to(dtype) for _ in range(3)]


def ref_top(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest |δ|, ties to the lowest index (a stable sort)."""
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.sort(delta.abs().flatten(), descending=True, stable=True).indices[:k]] = True
    return mask.view_as(delta)


def ref_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    return ref_top(delta, sparsify.keep_count(density, delta.numel()))


def ref_breadcrumbs(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = delta.numel()
    kept = int(density * n)
    top = min(int(gamma * n), n - kept)
    if kept == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    return ref_top(delta, kept + top) & ~ref_top(delta, top)


def whole_tensor_ties(base: torch.Tensor, experts: list[torch.Tensor], masks: list[torch.Tensor],
                      weight: tuple[float, ...], scale: float, normalize: bool) -> torch.Tensor:
    """The whole-tensor form the operators computed before streaming (same ops; 16-bit sources
    widened to float32 and the result rounded once: merge arithmetic 2)."""
    dtype, base, experts = base.dtype, base.float(), [e.float() for e in experts]
    deltas = [(e - base).mul_(m) for e, m in zip(experts, masks)]
    mixed = sparsify.disjoint_merge([d.mul_(w) for d, w in zip(deltas, weight)], weight, normalize)
    return (base + mixed.mul_(scale)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties"])
def test_deterministic_methods_equal_the_whole_tensor_form(one_thread: None, dtype: torch.dtype,
                                                           normalize: bool, name: str) -> None:
    """Chunked TIES/Breadcrumbs equal the whole-tensor computation exactly, with the trims of a
    stable sort (ties at a cut, common in bf16, go to the lowest indices)."""
    base, experts = sources(dtype)
    density, gamma, weight, scale = (0.3, 0.5, 0.7), (0.01, 0.02, 0.0), (0.9, 0.6, 1.2), 0.8
    if name == "ties":
        masks = [ref_trim(e.float() - base.float(), d) for e, d in zip(experts, density)]
        out = OPERATORS[name].fn(base, experts, density=density, weight=weight, scale=scale, normalize=normalize)
    else:
        masks = [ref_breadcrumbs(e.float() - base.float(), d, g) for e, d, g in zip(experts, density, gamma)]
        out = OPERATORS[name].fn(base, experts, density=density, gamma=gamma, weight=weight, scale=scale,
                                 normalize=normalize)
    assert torch.equal(out, whole_tensor_ties(base, experts, masks, weight, scale, normalize))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["one pass", "device cuts", "uncompiled"])
def test_magnitude_trim_keeps_the_top_k_set(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, path: str) -> None:
    """Every path keeps exactly the top-k set, ties at the cut (integer-valued δ) to the lowest
    indices, also when the tie split falls inside a later chunk of the uncompiled merge."""
    if path == "uncompiled":  # the native cuts, then fused._merge run uncompiled in chunks
        monkeypatch.setenv("EVOMERGE_FUSED", "0")
    g = torch.Generator().manual_seed(3)
    for delta in (torch.randn(BIG, generator=g).to(dtype), torch.randint(-20, 20, (BIG,), generator=g).to(dtype)):
        for density in (0.001, 0.1, 0.5, 0.97):
            merged = streaming.trimmed_merge(torch.zeros_like(delta), [delta], (1.0,),
                                             sparsify.ties_trims([density], BIG), scale=1.0, normalize=False,
                                             consensus=False, out=None, native_cuts=path != "device cuts")
            assert torch.equal(merged != 0, ref_trim(delta, density) & (delta != 0))


def test_results_do_not_depend_on_threads_or_chunks() -> None:
    """1 and 2 threads (different chunk sizes) give bit-identical random merges."""
    base, experts = sources(torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name in ("dare_ties", "dare_linear"):
                results.append(OPERATORS[name].fn(base, experts, density=(0.3, 0.5, 0.9), weight=(1.0, 0.5, 0.7),
                                                  generator=torch.Generator().manual_seed(9)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])


def test_dare_mask_is_a_function_of_the_index() -> None:
    """Drawing a mask in two pieces gives the whole mask."""
    draw = sparsify.DareDraw.draw(0.4, torch.Generator().manual_seed(1))
    whole = draw.keep_mask(torch.Size([BIG]), torch.device("cpu"))
    cut = 2 * 12_345
    words = torch.empty(BIG, dtype=torch.int32)
    spare, index = torch.empty_like(words), torch.arange(BIG, dtype=torch.int32)
    first = draw.mask_bits(0, torch.empty(cut, dtype=torch.int32), words, spare, index) != 0
    second = draw.mask_bits(cut, torch.empty(BIG - cut, dtype=torch.int32), words, spare, index) != 0
    assert torch.equal(torch.cat([first, second]), whole)


@pytest.mark.parametrize("density", [0.05, 0.5, 0.9])
def test_dare_masks_are_independent_bernoulli(density: float) -> None:
    """Keep rate within 4σ of p; neighbours (two halves of one word) and two experts' masks
    are uncorrelated (joint keep rate within 4σ of p²)."""
    g = torch.Generator().manual_seed(2)
    n = 400_000
    a, b = (sparsify.DareDraw.draw(density, g) for _ in range(2))
    assert abs(a.probability - density) <= 2.0 ** -17
    ma, mb = (d.keep_mask(torch.Size([n]), torch.device("cpu")).double() for d in (a, b))
    p = a.probability
    assert abs(float(ma.mean()) - p) < 4 * math.sqrt(p * (1 - p) / n)
    pairs = ma.view(-1, 2)
    for joint, count in ((float((pairs[:, 0] * pairs[:, 1]).mean()), n // 2), (float((ma * mb).mean()), n)):
        assert abs(joint - p * p) < 4 * math.sqrt(p * p * (1 - p * p) / count)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_consensus_equals_the_whole_tensor_form(one_thread: None, dtype: torch.dtype) -> None:
    """Chunked Consensus/TALL equals the whole-tensor computation exactly."""
    base, experts = sources(dtype)
    tall, weight, k, scale = (0.3, 0.5, 0.4), (1.0, 0.8, 0.6), 2.0, 0.9
    wide = base.float()  # 16-bit: computed in float32, rounded once (merge arithmetic 2)
    weighted = [(e.float() - wide).mul_(w) for e, w in zip(experts, weight)]
    total = torch.zeros_like(wide)
    for u in weighted:
        total += u
    votes = torch.zeros_like(total, dtype=torch.int32)
    for u, lam in zip(weighted, tall):
        votes += u.abs() > (total - u).abs_().mul_(lam)
    expected = total.mul_(votes >= 2).mul_(scale).add_(wide).to(dtype)
    out = OPERATORS["consensus"].fn(base, experts, tall=tall, weight=weight, k=k, scale=scale)
    assert torch.equal(out, expected)


def skip_unless_no_compiler() -> None:
    """A fused kernel did not run: skip where torch.compile cannot compile even x + 1 (no
    compiler), fail where it can (the kernel itself broke, or ran out of variants)."""
    try:
        torch.compile(lambda x: x + 1, fullgraph=True)(torch.ones(3))
    except Exception:
        pytest.skip("torch.compile does not work here (the operators merge eagerly)")
    pytest.fail("the fused kernel did not run although torch.compile works")


def fused_equals_eager(base: torch.Tensor, experts: list[torch.Tensor], weight: tuple[float, ...],
                       keep: list[streaming.Keep], consensus: bool) -> None:
    """The compiled kernel (called directly: the operators use it only above fused.FUSE_MIN
    entries) gives the eager pass's result bit for bit, normalized or not, at λ ≠ 1."""
    for normalize in (False, True):
        eager = streaming.task_vector_merge(base, experts, weight, scale=0.8, normalize=normalize,
                                            consensus=consensus, out=None, keep=keep)
        assert not fused.fusable(base, experts, keep, consensus, None)  # too small: eager
        out = torch.full_like(base, float("nan"))
        coeff = 0.8 / (sum(weight) if normalize and not consensus else 1.0)
        if not fused.merge(base, experts, weight, keep, scale=0.8, coeff=coeff, consensus=consensus,
                           normalize=normalize, out=out):
            skip_unless_no_compiler()
        assert torch.equal(out.view(torch.int32), eager.view(torch.int32))


@pytest.mark.parametrize("consensus", [True, False])
def test_fused_dare_kernel_equals_the_eager_pass(one_thread: None, consensus: bool) -> None:
    """DARE draws with keep-all and drop-all experts, a negative weight, exact zeros in a task
    vector, an odd length."""
    base, experts = sources(torch.float32, n=100_003, seed=4)
    experts[2][::7] = base[::7]
    experts.append(experts[0] * 0.5)
    g = torch.Generator().manual_seed(12)
    draws: list[streaming.Keep] = [sparsify.DareDraw.draw(d, g) for d in (0.3, 1.0, 0.0, 0.7)]
    fused_equals_eager(base, experts, (0.9, -0.4, 1.1, 0.5), draws, consensus)


@pytest.mark.parametrize("consensus", [True, False])
def test_fused_band_kernel_equals_the_uncompiled_chunks(monkeypatch: pytest.MonkeyPatch, one_thread: None,
                                                        consensus: bool) -> None:
    """TIES/Breadcrumbs trims (integer-valued δ: ties split at the cuts, some in the second chunk),
    a keep-nothing and a keep-all trim, with the TIES election (TIES, Breadcrumbs-TIES) or summed
    (Breadcrumbs), normalized or not: fused._merge compiled on the whole tensor gives what it gives
    run uncompiled over chunks (EVOMERGE_FUSED=0: each chunk told its first entry)."""
    g = torch.Generator().manual_seed(14)
    n = fused.FUSE_MIN + 37_003  # two chunks at one thread
    base = torch.randn(n, generator=g)
    experts = [base + torch.randint(-20, 20, (n,), generator=g).float() * 0.01 for _ in range(4)]
    trims = [sparsify.ties_trims([0.3], n)[0], sparsify.breadcrumbs_trims([0.5], [0.05], n)[0],
             sparsify.ties_trims([0.0], n)[0], sparsify.ties_trims([1.0], n)[0]]
    cuts = fused.trim_cuts(experts, base, sparsify.cut_wants(trims))
    assert any(chunk_size() <= until < n for until in cuts[:, 1].tolist())  # a tie split in chunk 2
    weight = (0.9, -0.4, 1.1, 0.5)
    for normalize in (False, True):
        coeff = 0.8 / (sum(weight) if normalize and not consensus else 1.0)
        results = []
        for fused_on in ("1", "0"):
            monkeypatch.setenv("EVOMERGE_FUSED", fused_on)
            out = torch.full_like(base, float("nan"))
            fused.trimmed_merge(base, experts, weight, trims, scale=0.8, coeff=coeff, consensus=consensus,
                                normalize=normalize, out=out)
            results.append(out)
        compiled, uncompiled = results
        if fused._MERGE.broken:
            skip_unless_no_compiler()
        assert torch.equal(compiled.view(torch.int32), uncompiled.view(torch.int32))


def test_fused_path_is_chosen_by_size_and_dtype_only() -> None:
    """Contiguous float32, bfloat16 and float16 DARE merges of FUSE_MIN entries or more fuse on the
    CPU, summed or with the TIES election; mixed keeps and dtypes, other dtypes and smaller tensors
    stay eager (TIES and Breadcrumbs never take the eager pass: fused.trimmed_merge)."""
    big = torch.empty(fused.FUSE_MIN)
    draw = sparsify.DareDraw.draw(0.5, torch.Generator().manual_seed(0))
    assert fused.fusable(big, [big, big], [draw, draw], True, None)
    assert fused.fusable(big, [big], [draw], False, big)
    assert not fused.fusable(big, [big, big], [draw, None], True, None)
    assert not fused.fusable(big[1:], [big[1:]], [draw], True, None)
    assert fused.fusable(big.bfloat16(), [big.bfloat16()], [draw], True, None)
    assert fused.fusable(big.half(), [big.half()], [draw], False, big.half())
    assert not fused.fusable(big.bfloat16(), [big], [draw], True, None)
    assert not fused.fusable(big.double(), [big.double()], [draw], True, None)


def test_a_kernel_that_cannot_compile_falls_back_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """A compile failure is logged once and reported (False), and the kernel is not tried again."""
    def uncompilable(x: torch.Tensor) -> None:
        torch._dynamo.graph_break()  # fullgraph compilation refuses a graph break
        x.add_(1.0)

    kernel = fused.Compiled(uncompilable)
    with caplog.at_level("WARNING", logger="evomerge.workers.kernels.fused"):
        assert kernel(torch.ones(4)) is False
        assert kernel(torch.ones(4)) is False
    assert kernel.broken and len(caplog.records) == 1 and "merging eagerly" in caplog.records[0].getMessage()


def test_fused_consensus_kernel_equals_the_eager_pass(one_thread: None) -> None:
    """Consensus/TALL by the compiled kernel equals the eager chunked pass bit for bit (with and
    without normalization, exact zeros in a task vector, a negative weight)."""
    base, experts = sources(torch.float32, n=100_003, seed=5)
    experts[1][::5] = base[::5]
    tall, weight, k, scale = (0.3, 0.5, 0.4), (1.0, -0.8, 0.6), 2.0, 0.9
    for normalize in (False, True):
        eager = OPERATORS["consensus"].fn(base, experts, tall=tall, weight=weight, k=k, scale=scale, normalize=normalize)
        out = torch.full_like(base, float("nan"))
        if not fused.consensus_merge(base, experts, weight, tall, 2, sum(weight) if normalize else None, scale, out):
            skip_unless_no_compiler()
        assert torch.equal(out.view(torch.int32), eager.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selection_splits_ties_far_into_the_tensor(dtype: torch.dtype) -> None:
    """The native and the device selection find a tie split past the first 2^20 entries (all |δ|
    equal but 50 larger ones at the end), and keep exactly the top-k set."""
    chunk = 1 << 20
    n = chunk + 4097
    delta = torch.ones(n, dtype=dtype)
    delta[-50:] = -3.0
    delta[7] = 0.0
    k = 50 + chunk + 100
    want = [[int(torch.tensor(1.0).view(torch.int32)), chunk + 101]]  # entry 7 is not a tie
    base = torch.full((n,), 0.5, dtype=dtype)
    for b, x in ((None, delta), (base, delta + base)):  # δ formed from a base too
        assert fused.trim_cuts([x], b, [(0, k)]).tolist() == want
        assert fused.trim_cuts([x], b, [(0, k)], native_path=False).tolist() == want
    merged = streaming.trimmed_merge(torch.zeros_like(delta), [delta], (1.0,), sparsify.ties_trims([k / n], n),
                                     scale=1.0, normalize=False, consensus=False, out=None)
    assert torch.equal(merged != 0, ref_top(delta, k) & (delta != 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["plain", "ties"])
def test_device_trimmed_merge_equals_the_other_paths(dtype: torch.dtype, kind: str) -> None:
    """The GPU's TIES/Breadcrumbs path (cuts by whole-tensor selection on the device, keys built
    there, no read back), run here on the CPU, and the native cuts with the same compiled merge:
    the same bits as the one-pass kernel (or, where its sample misled, the native cuts), with ties at the cuts, a keep-nothing and a keep-all
    trim, a drop cut, normalized or not."""
    g = torch.Generator().manual_seed(8)
    n = 300_007
    base = torch.randn(n, generator=g) * 0.02
    noise = [torch.randint(-6, 7, (n,), generator=g).float() * 1e-3 if kind == "ties"
             else torch.randn(n, generator=g) * 2e-3 for _ in range(3)]
    experts = [(base + d).to(dtype) for d in noise]
    base = base.to(dtype)
    weight = [0.9, -0.4, 1.1]
    for trims, consensus in ((sparsify.ties_trims([0.3, 0.0, 1.0], n), True),
                             (sparsify.breadcrumbs_trims([0.3, 0.5, 0.9], [0.02, 0.1, 0.0], n), False),
                             (sparsify.breadcrumbs_trims([0.3, 0.5, 0.9], [0.02, 0.1, 0.0], n), True)):
        for normalize in (False, True):
            expected = streaming.trimmed_merge(base, experts, weight, trims, scale=0.8, normalize=normalize,
                                               consensus=consensus, out=None)  # the one pass, where it takes them
            coeff = 0.8 / (sum(weight) if normalize and not consensus else 1.0)
            for native_cuts in (False, True):
                out = torch.full_like(base, float("nan"))
                fused.trimmed_merge(base, experts, weight, trims, scale=0.8, coeff=coeff, consensus=consensus,
                                    normalize=normalize, out=out, native_path=native_cuts)
                assert torch.equal(out, expected), (consensus, normalize, native_cuts)
            if fused._MERGE.broken:
                skip_unless_no_compiler()


def test_the_device_trims_launch_at_most_8_kernels_and_never_sync() -> None:
    """TIES and Breadcrumbs(-TIES) on the device path: the cuts and the keys in one graph (a copy of
    one host table, the selection, a few kernels beside it), then the merge; no read back. Before
    the cuts shared a graph: 22 (TIES) and 32 (Breadcrumbs) per tensor."""
    for name, (launches, syncs) in merge_launches(("ties", "breadcrumbs", "breadcrumbs_ties")).items():
        assert launches >= 3, name  # the copy, the selection and the merge were seen
        assert launches <= 8 and syncs == 0, (name, launches, syncs)


def test_device_cuts_equal_the_selected_cuts() -> None:
    """fused.device_cuts (no read back) gives the cuts the native selection gives, ties included."""
    g = torch.Generator().manual_seed(9)
    n = 50_021
    base = torch.randn(n, generator=g) * 0.02
    experts = [(base + torch.randint(-4, 5, (n,), generator=g).float() * 1e-3).bfloat16() for _ in range(2)]
    wants = [(0, 1), (0, 20_000), (1, 49_000), (1, 7)]
    cuts = selection.native_cuts(experts, base.bfloat16(), wants)
    assert cuts is not None and all(c is not None for c in cuts)
    got = fused.device_cuts(experts, base.bfloat16(), wants).tolist()
    assert got == [[c.value, selection.NO_SPLIT if c.until is None else c.until] for c in cuts if c is not None]
