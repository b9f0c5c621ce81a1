import numpy as np
import pytest
import torch

import fastfuse
from fastfuse import backends
from testing_utils import DTYPES, assert_close, backend_params, non_contiguous


# ---------------------------------------------------------------------------------------------
# Oracles, written independently of fastfuse.reference.select.

def sort_oracle(score: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """A stable argsort (ties keep the lower index first), its first k, sorted by index."""
    s = score.double().numpy()
    nan = np.isnan(s).astype(np.int64)
    s = np.where(nan == 1, np.inf, s)  # NaN ranks above +inf: as inf, then after every inf by the flag
    rows = []
    for b in range(s.shape[0]):
        # lexsort: last key is primary. Order by (value, nan flag), both reversed for largest.
        order = np.lexsort((np.arange(s.shape[1]), -nan[b] if largest else nan[b], -s[b] if largest else s[b]))
        rows.append(np.sort(order[:k]))
    return torch.from_numpy(np.stack(rows)).long()


def gather_oracle(feat, idx, valid=None):
    flat = feat.reshape(feat.shape[0], feat.shape[1], -1)
    out = torch.stack([flat[b].index_select(1, idx[b].long()) for b in range(flat.shape[0])])
    return out if valid is None else out * valid[:, None, :]


def scatter_oracle(base, values, idx, valid=None, reduce="add"):
    flat = base.reshape(base.shape[0], base.shape[1], -1).clone()
    for b in range(flat.shape[0]):
        for k in range(idx.shape[1]):  # in slot order: for "replace" the last valid slot wins
            if valid is not None and not valid[b, k]:
                continue
            if reduce == "add":
                flat[b, :, idx[b, k]] += values[b, :, k]
            else:
                flat[b, :, idx[b, k]] = values[b, :, k]
    return flat.reshape(base.shape)


def tied_scores(shape, generator, dtype=torch.float64):
    """Scores from a handful of values, so that ties are the rule rather than the exception."""
    return torch.randint(-3, 4, shape, generator=generator).to(dtype) / 2


# ---------------------------------------------------------------------------------------------
# select_points

@pytest.mark.parametrize("largest", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_select_matches_stable_sort_with_ties(largest, dtype):
    g = torch.Generator().manual_seed(0)
    score = tied_scores((3, 41), g, dtype)
    for k in (0, 1, 6, 40, 41):
        idx = fastfuse.select_points(score, k, largest=largest)
        assert idx.dtype == torch.int64 and idx.shape == (3, k)
        torch.testing.assert_close(idx, sort_oracle(score, k, largest), msg=f"k={k}")


def test_select_continuous_scores_and_4d():
    g = torch.Generator().manual_seed(1)
    score = torch.rand(2, 1, 5, 7, generator=g)
    idx = fastfuse.select_points(score, 9, largest=True)
    torch.testing.assert_close(idx, sort_oracle(score.reshape(2, -1), 9, True))
    expected = torch.topk(score.reshape(2, -1), 9).indices.sort(1).values
    torch.testing.assert_close(idx, expected)


def test_select_nan_ranks_above_inf_and_signed_zeros_tie():
    nan, inf = float("nan"), float("inf")
    score = torch.tensor([[0.0, nan, inf, -0.0, -inf, 1.0, nan, 0.0]])
    assert fastfuse.select_points(score, 3).tolist() == [[0, 3, 4]]  # -inf, then the zeros by index
    assert fastfuse.select_points(score, 3, largest=True).tolist() == [[1, 2, 6]]  # both NaN, then inf
    assert fastfuse.select_points(score, 7).tolist() == [[0, 1, 2, 3, 4, 5, 7]]  # the second NaN is last


def test_select_tensor_k_with_capacity():
    g = torch.Generator().manual_seed(2)
    score = tied_scores((5, 13), g)
    k = torch.tensor([0, 3, 13, 40, -2])  # 40 and -2 are clamped to [0, min(capacity, L)]
    for capacity, largest in ((6, False), (20, True), (0, False)):
        idx, valid = fastfuse.select_points(score, k, capacity=capacity, largest=largest)
        assert idx.shape == valid.shape == (5, capacity) and idx.dtype == torch.int64 and valid.dtype == torch.bool
        counts = k.clamp(0, min(capacity, 13))
        for b in range(5):
            n = int(counts[b])
            assert valid[b].tolist() == [True] * n + [False] * (capacity - n)
            torch.testing.assert_close(idx[b, :n], sort_oracle(score[b:b + 1], n, largest)[0])
            assert (idx[b, n:] == 0).all()


def test_select_tensor_k_int32_and_batch_one():
    score = torch.tensor([[3.0, 1.0, 2.0]])
    idx, valid = fastfuse.select_points(score, torch.tensor([2], dtype=torch.int32), capacity=3)
    assert idx.tolist() == [[1, 2, 0]] and valid.tolist() == [[True, True, False]]


def test_select_empty():
    assert fastfuse.select_points(torch.rand(0, 5), 2).shape == (0, 2)
    assert fastfuse.select_points(torch.rand(2, 0), 0).shape == (2, 0)
    idx, valid = fastfuse.select_points(torch.rand(2, 0), torch.tensor([1, 0]), capacity=2)
    assert idx.shape == (2, 2) and not valid.any()


def test_select_bad_inputs():
    score = torch.rand(2, 10)
    with pytest.raises(ValueError, match=r"k must be in \[0, L\]"):
        fastfuse.select_points(score, 11)
    with pytest.raises(ValueError, match=r"k must be in \[0, L\]"):
        fastfuse.select_points(score, -1)
    with pytest.raises(TypeError, match="k must be an int"):
        fastfuse.select_points(score, 2.0)
    with pytest.raises(ValueError, match="needs capacity"):
        fastfuse.select_points(score, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="only used with a tensor k"):
        fastfuse.select_points(score, 2, capacity=4)
    with pytest.raises(ValueError, match=r"k must have shape \(2\)"):
        fastfuse.select_points(score, torch.tensor([1, 2, 3]), capacity=4)
    with pytest.raises(TypeError, match="k must have dtype"):
        fastfuse.select_points(score, torch.tensor([1.0, 2.0]), capacity=4)
    with pytest.raises(ValueError, match="one channel"):
        fastfuse.select_points(torch.rand(2, 3, 4, 4), 2)
    with pytest.raises(ValueError, match="score must be 2-D or 4-D"):
        fastfuse.select_points(torch.rand(10), 2)
    with pytest.raises(TypeError, match="score must have dtype"):
        fastfuse.select_points(torch.arange(10).view(2, 5), 2)


def test_select_ignores_requires_grad():
    score = torch.rand(2, 6, requires_grad=True)
    idx = fastfuse.select_points(score, 2)
    assert not idx.requires_grad


# ---------------------------------------------------------------------------------------------
# gather / scatter, torch backend against the oracles

def _slots(g, B, K, L, with_duplicates=True):
    idx = torch.randint(0, L, (B, K), generator=g)
    if with_duplicates and K >= 3:
        idx[:, 1] = idx[:, 0]  # a duplicate in every row
        idx[:, -1] = idx[:, 0]
    valid = torch.rand(B, K, generator=g) > 0.25
    return idx, valid


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 4, 9), (1, 1, 1, 1)])
def test_gather_scatter_reference_against_oracles(shape):
    g = torch.Generator().manual_seed(3)
    feat = torch.rand(shape, generator=g, dtype=torch.float64)
    B, C, L = shape[0], shape[1], int(np.prod(shape[2:]))
    idx, valid = _slots(g, B, 6, L)
    values = torch.rand(B, C, 6, generator=g, dtype=torch.float64)
    other = torch.rand(shape, generator=g, dtype=torch.float64)
    for v in (None, valid):
        for index in (idx, idx.int()):
            torch.testing.assert_close(fastfuse.gather_points(feat, index, v, backend="torch"),
                                       gather_oracle(feat, idx, v))
            torch.testing.assert_close(fastfuse.gather_sum_points(feat, other, index, v, backend="torch"),
                                       gather_oracle(feat + other, idx, v))
            for reduce in ("add", "replace"):
                torch.testing.assert_close(
                    fastfuse.scatter_points(feat, values, index, reduce=reduce, valid=v, backend="torch"),
                    scatter_oracle(feat, values, idx, v, reduce))
            torch.testing.assert_close(fastfuse.add_scatter_points(feat, other, values, index, v, backend="torch"),
                                       scatter_oracle(feat + other, values, idx, v))


def test_scatter_add_matches_torch_scatter_add():
    g = torch.Generator().manual_seed(4)
    base = torch.rand(2, 3, 6, 5, generator=g)
    idx, _ = _slots(g, 2, 8, 30)
    values = torch.rand(2, 3, 8, generator=g)
    expected = base.reshape(2, 3, 30).scatter_add(2, idx[:, None].expand(2, 3, 8), values).reshape(base.shape)
    torch.testing.assert_close(fastfuse.scatter_points(base, values, idx, backend="torch"), expected)


def test_replace_last_valid_slot_wins():
    base = torch.zeros(1, 1, 4)
    values = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    idx = torch.tensor([[2, 2, 2, 0]])
    valid = torch.tensor([[True, True, False, True]])
    out = fastfuse.scatter_points(base, values, idx, reduce="replace", valid=valid, backend="torch")
    assert out.tolist() == [[[4.0, 0.0, 2.0, 0.0]]]  # slot 2 is invalid, so slot 1 wins point 2


def test_invalid_slots_are_never_read():
    feat = torch.rand(1, 2, 5)
    idx = torch.tensor([[1, 99, -7]])  # out of range, but only in invalid slots
    valid = torch.tensor([[True, False, False]])
    out = fastfuse.gather_points(feat, idx, valid, backend="torch")
    torch.testing.assert_close(out, torch.stack([feat[:, :, 1], torch.zeros(1, 2), torch.zeros(1, 2)], -1))
    scattered = fastfuse.scatter_points(feat, torch.full((1, 2, 3), float("nan")), idx, valid=valid,
                                        backend="torch")
    assert torch.isnan(scattered[:, :, 1]).all() and torch.isfinite(scattered[:, :, [0, 2, 3, 4]]).all()


def test_torch_backend_raises_on_out_of_range_index():
    feat = torch.rand(1, 2, 5)
    with pytest.raises((IndexError, RuntimeError), match="out of bounds|index"):
        fastfuse.gather_points(feat, torch.tensor([[5]]), backend="torch")
    with pytest.raises((IndexError, RuntimeError), match="out of bounds|index"):
        fastfuse.scatter_points(feat, torch.rand(1, 2, 1), torch.tensor([[-1]]), backend="torch")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck(backend):
    if backends.unavailable_reason("gather_points", backend, torch.device("cpu")) is not None:
        pytest.skip(str(backends.unavailable_reason("gather_points", backend, torch.device("cpu"))))
    g = torch.Generator().manual_seed(5)
    a = torch.rand(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    values = torch.rand(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    idx, valid = _slots(g, 2, 5, 12)
    for v in (None, valid):
        assert torch.autograd.gradcheck(lambda t: fastfuse.gather_points(t, idx, v, backend=backend), (a,))
        assert torch.autograd.gradcheck(lambda s, t: fastfuse.gather_sum_points(s, t, idx, v, backend=backend),
                                        (a, b))
        for reduce in ("add", "replace"):
            assert torch.autograd.gradcheck(
                lambda s, t: fastfuse.scatter_points(s, t, idx, reduce=reduce, valid=v, backend=backend), (a, values))
        assert torch.autograd.gradcheck(
            lambda s, t, u: fastfuse.add_scatter_points(s, t, u, idx, v, backend=backend), (a, b, values))


def test_gather_scatter_empty():
    feat = torch.rand(2, 3, 4)
    assert fastfuse.gather_points(feat, torch.zeros(2, 0, dtype=torch.long)).shape == (2, 3, 0)
    out = fastfuse.scatter_points(feat, torch.rand(2, 3, 0), torch.zeros(2, 0, dtype=torch.long))
    torch.testing.assert_close(out, feat)
    assert fastfuse.gather_points(torch.rand(0, 3, 4), torch.zeros(0, 2, dtype=torch.long)).shape == (0, 3, 2)


def test_gather_scatter_bad_inputs():
    feat = torch.rand(2, 3, 4, 4)
    idx = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="feat must be 3-D or 4-D"):
        fastfuse.gather_points(feat[0, 0], idx)
    with pytest.raises(TypeError, match="idx must have dtype"):
        fastfuse.gather_points(feat, idx.float())
    with pytest.raises(ValueError, match=r"idx must have shape \(B, K\) with B = 2"):
        fastfuse.gather_points(feat, idx[:1])
    with pytest.raises(TypeError, match="valid must have dtype"):
        fastfuse.gather_points(feat, idx, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"valid must have shape \(2, 5\)"):
        fastfuse.gather_points(feat, idx, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no points"):
        fastfuse.gather_points(torch.rand(2, 3, 0), idx)
    with pytest.raises(ValueError, match=r"values must have shape \(2, 3, 5\)"):
        fastfuse.scatter_points(feat, torch.rand(2, 3, 4), idx)
    with pytest.raises(TypeError, match="same dtype"):
        fastfuse.scatter_points(feat, torch.rand(2, 3, 5, dtype=torch.float64), idx)
    with pytest.raises(ValueError, match="reduce must be one of"):
        fastfuse.scatter_points(feat, torch.rand(2, 3, 5), idx, reduce="max")
    with pytest.raises(ValueError, match="same shape"):
        fastfuse.gather_sum_points(feat, torch.rand(2, 3, 4, 5), idx)
    with pytest.raises(ValueError, match="same shape"):
        fastfuse.add_scatter_points(feat, torch.rand(2, 3, 16), torch.rand(2, 3, 5), idx)
    with pytest.raises(ValueError, match="one device"):
        fastfuse.gather_points(feat, idx.to("meta"))
    with pytest.raises(ValueError, match="one device"):
        fastfuse.select_points(torch.rand(2, 10), torch.tensor([1, 2], device="meta"), capacity=3)
    with pytest.raises(RuntimeError, match="unavailable"):
        fastfuse.gather_points(feat, idx, backend="cuda")


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(6)
    score = torch.rand(2, 1, 4, 5, generator=g)
    a = torch.rand(2, 3, 4, 5, generator=g, requires_grad=True)
    b = torch.rand(2, 3, 4, 5, generator=g)
    counts = torch.tensor([3, 5])

    def step(score, a, b, counts):
        idx = fastfuse.select_points(score, 4, largest=True)
        pts = fastfuse.gather_sum_points(a, b, idx)
        masked_idx, valid = fastfuse.select_points(score, counts, capacity=6)
        out = fastfuse.add_scatter_points(a, b, pts * 2, idx)
        out = fastfuse.scatter_points(out, fastfuse.gather_points(a, masked_idx, valid), masked_idx,
                                      reduce="replace", valid=valid)
        return out.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(score, a, b, counts).backward()
    grad = a.grad.clone()
    a.grad = None
    step(score, a, b, counts).backward()
    torch.testing.assert_close(grad, a.grad)


# ---------------------------------------------------------------------------------------------
# Kernels (the C++ cpu backend, and triton through the interpreter on CPU), against the float64 reference.

KERNEL_SHAPES = [((2, 5, 3, 7), 11), ((1, 1, 1, 1), 3), ((1, 3, 40), 37)]


def _kernel_case(shape, K, dtype, device, g):
    B, C, L = shape[0], shape[1], int(np.prod(shape[2:]))
    base64 = torch.rand(shape, generator=g, dtype=torch.float64)
    other64 = torch.rand(shape, generator=g, dtype=torch.float64)
    values64 = torch.rand(B, C, K, generator=g, dtype=torch.float64)
    idx, valid = _slots(g, B, K, L)
    # Round to the kernel dtype first: the comparison then measures only the kernel's arithmetic.
    base64, other64, values64 = (t.to(dtype).double() for t in (base64, other64, values64))
    return base64, other64, values64, idx.to(device), valid.to(device)


@pytest.mark.parametrize("shape,K", KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", backend_params("gather_points"))
def test_kernel_gather(shape, K, dtype, device, backend):
    g = torch.Generator().manual_seed(7)
    a64, b64, _, idx, valid = _kernel_case(shape, K, dtype, device, g)
    a = non_contiguous(a64.to(device, dtype)).requires_grad_(True)
    b = b64.to(device, dtype).requires_grad_(True)
    for v, index in ((valid, idx), (None, idx.int())):
        out = fastfuse.gather_points(a, index, v, backend=backend)
        ar = a64.clone().requires_grad_(True)
        ref = fastfuse.gather_points(ar, index.cpu(), None if v is None else v.cpu(), backend="torch")
        assert out.dtype == dtype and out.shape == ref.shape
        assert_close(out, ref, dtype, name="gather")
        grad64 = torch.rand(ref.shape, generator=g, dtype=torch.float64).to(dtype).double()
        (da,) = torch.autograd.grad(out, a, grad64.to(device, dtype))
        (dar,) = torch.autograd.grad(ref, ar, grad64)
        assert_close(da, dar, dtype, name="d feat")

        out = fastfuse.gather_sum_points(a, b, index, v, backend=backend)
        ar, br = a64.clone().requires_grad_(True), b64.clone().requires_grad_(True)
        ref = fastfuse.gather_sum_points(ar, br, index.cpu(), None if v is None else v.cpu(), backend="torch")
        assert_close(out, ref, dtype, name="gather_sum")
        da, db = torch.autograd.grad(out, (a, b), grad64.to(device, dtype))
        dar, dbr = torch.autograd.grad(ref, (ar, br), grad64)
        assert_close(da, dar, dtype, name="d a")
        assert_close(db, dbr, dtype, name="d b")


@pytest.mark.parametrize("shape,K", KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", backend_params("scatter_points"))
def test_kernel_scatter(shape, K, dtype, device, backend):
    g = torch.Generator().manual_seed(8)
    base64, other64, values64, idx, valid = _kernel_case(shape, K, dtype, device, g)
    base = non_contiguous(base64.to(device, dtype)).requires_grad_(True)
    other = other64.to(device, dtype).requires_grad_(True)
    values = values64.to(device, dtype).requires_grad_(True)
    grad64 = torch.rand(base64.shape, generator=g, dtype=torch.float64).to(dtype).double()
    for reduce in ("add", "replace"):
        out = fastfuse.scatter_points(base, values, idx, reduce=reduce, valid=valid, backend=backend)
        br, vr = base64.clone().requires_grad_(True), values64.clone().requires_grad_(True)
        ref = fastfuse.scatter_points(br, vr, idx.cpu(), reduce=reduce, valid=valid.cpu(), backend="torch")
        assert out.dtype == dtype and out.shape == base.shape
        assert_close(out, ref, dtype, name=f"scatter {reduce}")
        d_base, d_values = torch.autograd.grad(out, (base, values), grad64.to(device, dtype))
        d_base_ref, d_values_ref = torch.autograd.grad(ref, (br, vr), grad64)
        assert_close(d_base, d_base_ref, dtype, name=f"d base {reduce}")
        assert_close(d_values, d_values_ref, dtype, name=f"d values {reduce}")

    out = fastfuse.add_scatter_points(base, other, values, idx, valid, backend=backend)
    br, orr, vr = (t.clone().requires_grad_(True) for t in (base64, other64, values64))
    ref = fastfuse.add_scatter_points(br, orr, vr, idx.cpu(), valid.cpu(), backend="torch")
    assert_close(out, ref, dtype, name="add_scatter")
    grads = torch.autograd.grad(out, (base, other, values), grad64.to(device, dtype))
    grads_ref = torch.autograd.grad(ref, (br, orr, vr), grad64)
    for got, want, name in zip(grads, grads_ref, ("d base1", "d base2", "d values")):
        assert_close(got, want, dtype, name=name)


@pytest.mark.parametrize("device,backend", backend_params("scatter_points"))
def test_kernel_many_duplicates_and_out_of_range(device, backend):
    # Out-of-range indices are invalid slots in the GPU kernels; on CPU every backend raises the
    # torch backend's IndexError (then the duplicates are checked with those slots masked).
    base = torch.rand(2, 3, 10, device=device)
    idx = torch.tensor([[4, 4, 4, 4, 4, 10, -1, 0], [9, 9, 0, 9, 12, 9, 9, 9]], device=device)
    values = torch.rand(2, 3, 8, device=device)
    in_range = (idx >= 0) & (idx < 10)
    safe = torch.where(in_range, idx, torch.zeros_like(idx))
    valid = None
    if device == "cpu" and backend == "cpu":
        with pytest.raises(IndexError, match=r"idx\[0, 5\] = 10 is an index outside \[0, L\)"):
            fastfuse.scatter_points(base, values, idx, backend=backend)
        valid = in_range
    for reduce in ("add", "replace"):
        out = fastfuse.scatter_points(base, values, idx, reduce=reduce, valid=valid, backend=backend)
        expected = scatter_oracle(base.cpu(), values.cpu(), safe.cpu(), in_range.cpu(), reduce)
        torch.testing.assert_close(out.cpu(), expected)
    gathered = fastfuse.gather_points(base, idx, valid, backend=backend)
    torch.testing.assert_close(gathered.cpu(), gather_oracle(base.cpu(), safe.cpu(), in_range.cpu()))


@pytest.mark.parametrize("device,backend", backend_params("gather_points"))
def test_kernel_empty(device, backend):
    feat = torch.rand(2, 3, 4, device=device, requires_grad=True)
    empty_idx = torch.zeros(2, 0, dtype=torch.long, device=device)
    out = fastfuse.gather_points(feat, empty_idx, backend=backend)
    assert out.shape == (2, 3, 0)
    out.sum().backward()
    assert (feat.grad == 0).all()
    torch.testing.assert_close(fastfuse.scatter_points(feat, out, empty_idx, backend=backend), feat)


# ---------------------------------------------------------------------------------------------
# The cpu backend's C++ kernels (fastfuse/cpu/select.py), beyond the shared kernel tests above:
# selection over rows long enough for several radix rounds, awkward shapes, strided inputs and
# gradients, the torch backend's index errors, and results that do not depend on the threads.

CPU_UNAVAILABLE = backends.unavailable_reason("gather_points", "cpu", torch.device("cpu"))
needs_cpu = pytest.mark.skipif(CPU_UNAVAILABLE is not None, reason=str(CPU_UNAVAILABLE))
SELECT_OPS = ("select_points", "gather_points", "gather_sum_points", "scatter_points", "add_scatter_points")


def _special_scores(score: torch.Tensor) -> torch.Tensor:
    """NaN, ±inf and both zeros sprinkled over a row (NaN above +inf, -0.0 tied with +0.0)."""
    score = score.clone()
    score[:, ::7] = float("nan")
    score[:, 3::11] = float("inf")
    score[:, 5::13] = float("-inf")
    score[:, 1::9] = -0.0
    score[:, 2::9] = 0.0
    return score


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cpu_select_matches_the_oracle(dtype):
    g = torch.Generator().manual_seed(20)
    L = 3000
    continuous = torch.randn(3, L, generator=g, dtype=torch.float64).to(dtype)
    strided = torch.randn(L, 3, generator=g, dtype=torch.float64).to(dtype).t()  # stride 3 along L
    for score in (continuous, tied_scores((3, L), g, dtype), _special_scores(continuous), strided):
        for k in (1, 2, 500, L - 1, L):
            for largest in (False, True):
                idx = fastfuse.select_points(score, k, largest=largest, backend="cpu")
                assert idx.dtype == torch.int64 and idx.shape == (3, k) and idx.is_contiguous()
                torch.testing.assert_close(idx, sort_oracle(score, k, largest), msg=f"k={k} largest={largest}")
        counts = torch.tensor([0, 1, 777, L + 5])[:3]
        for capacity in (1, 800, L + 2):
            got = fastfuse.select_points(score, counts, capacity=capacity, largest=True, backend="cpu")
            want = fastfuse.select_points(score, counts, capacity=capacity, largest=True, backend="torch")
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"capacity={capacity}"


@needs_cpu
def test_cpu_select_batch_one_and_a_single_point():
    score = torch.tensor([[2.0]])
    assert fastfuse.select_points(score, 1, backend="cpu").tolist() == [[0]]
    idx, valid = fastfuse.select_points(score, torch.tensor([3]), capacity=2, backend="cpu")
    assert idx.tolist() == [[0, 0]] and valid.tolist() == [[True, False]]
    idx, valid = fastfuse.select_points(torch.rand(2, 0), torch.tensor([1, 0]), capacity=2, backend="cpu")
    assert idx.tolist() == [[0, 0], [0, 0]] and not valid.any()


# (map shape, K): one point and one slot, K = L, size-1 dims, batch 1, more slots than points.
CPU_SHAPES = [((1, 1, 1, 1), 1), ((1, 3, 1, 7), 7), ((2, 1, 5, 1), 1), ((3, 4, 6, 5), 30), ((2, 3, 17), 40)]


def _cpu_case(shape, K, dtype, g):
    B, C, L = shape[0], shape[1], int(np.prod(shape[2:]))
    maps = [torch.rand(shape, generator=g, dtype=torch.float64).to(dtype).double() for _ in range(2)]
    values = torch.rand(B, C, K, generator=g, dtype=torch.float64).to(dtype).double()
    if K == L:  # a permutation of the points, every slot valid
        idx = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
        valid = torch.ones(B, K, dtype=torch.bool)
    else:
        idx, valid = _slots(g, B, K, L)
    return maps, values, idx, valid


def _spaced(t: torch.Tensor) -> torch.Tensor:
    """Same values, every element stride doubled (points evenly spaced but not adjacent)."""
    return torch.stack([t, t], -1)[..., 0]


def _strided(t: torch.Tensor) -> torch.Tensor:
    """Same values, rows of points that are not evenly spaced where the shape allows it."""
    return non_contiguous(t) if t.shape[-1] > 1 and t.shape[-2] > 1 else _spaced(t)


@needs_cpu
@pytest.mark.parametrize("shape,K", CPU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_gather_scatter_against_the_reference(shape, K, dtype):
    g = torch.Generator().manual_seed(21)
    (a64, b64), values64, idx, valid = _cpu_case(shape, K, dtype, g)
    grad_map = _spaced(torch.rand(shape, generator=g, dtype=torch.float64).to(dtype).double())
    grad_slots = _spaced(torch.rand(values64.shape, generator=g, dtype=torch.float64).to(dtype).double())

    def run(backend, cast, a, b, values, v):
        leaves = [cast(t).requires_grad_(True) for t in (a, b, values)]
        x, y, u = leaves
        outs = {
            "gather": (fastfuse.gather_points(x, idx, v, backend=backend), (x,), grad_slots),
            "gather_sum": (fastfuse.gather_sum_points(x, y, idx, v, backend=backend), (x, y), grad_slots),
            "scatter add": (fastfuse.scatter_points(x, u, idx, valid=v, backend=backend), (x, u), grad_map),
            "scatter replace": (fastfuse.scatter_points(x, u, idx, reduce="replace", valid=v, backend=backend),
                                (x, u), grad_map),
            "add_scatter": (fastfuse.add_scatter_points(x, y, u, idx, v, backend=backend), (x, y, u), grad_map),
        }
        return {name: (out, torch.autograd.grad(out, wrt, cast(grad))) for name, (out, wrt, grad) in outs.items()}

    for v in (None, valid):
        got = run("cpu", lambda t: _strided(t.to(dtype)), a64, b64, values64, v)
        want = run("torch", lambda t: t.clone(), a64, b64, values64, v)
        for name, (out, grads) in got.items():
            ref, ref_grads = want[name]
            assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
            assert_close(out, ref, dtype, name=name)
            for i, (d, dref) in enumerate(zip(grads, ref_grads)):
                assert d.dtype == dtype and d.shape == dref.shape
                assert_close(d, dref, dtype, name=f"{name} grad {i}")


def _calls(feat, other, values, idx, valid):
    return {
        "gather": lambda be: fastfuse.gather_points(feat, idx, valid, backend=be),
        "gather_sum": lambda be: fastfuse.gather_sum_points(feat, other, idx, valid, backend=be),
        "scatter add": lambda be: fastfuse.scatter_points(feat, values, idx, valid=valid, backend=be),
        "scatter replace": lambda be: fastfuse.scatter_points(feat, values, idx, reduce="replace", valid=valid,
                                                              backend=be),
        "add_scatter": lambda be: fastfuse.add_scatter_points(feat, other, values, idx, valid, backend=be),
    }


@needs_cpu
def test_cpu_out_of_range_indices_raise_the_torch_backends_error():
    feat, other, values = torch.rand(2, 3, 2, 5), torch.rand(2, 3, 2, 5), torch.rand(2, 3, 4)
    for bad in (10, -1, 2**40):
        idx = torch.tensor([[0, 3, 9, 9], [1, bad, 2, bad]])
        for name, call in _calls(feat, other, values, idx, None).items():
            with pytest.raises(IndexError) as want:
                call("torch")
            with pytest.raises(IndexError, match=r"idx\[1, 1\] = .* outside \[0, L\) with L = 10") as got:
                call("cpu")
            assert str(got.value) == str(want.value), name
        # In invalid slots the same indices are never read.
        valid = torch.tensor([[True, True, False, True], [True, False, True, False]])
        for name, call in _calls(feat, other, values, idx, valid).items():
            torch.testing.assert_close(call("cpu"), call("torch"), msg=name)


@needs_cpu
def test_cpu_results_do_not_depend_on_the_thread_count():
    """Large enough to run on several threads; many duplicates, so the sums' order matters."""
    g = torch.Generator().manual_seed(23)
    B, C, L, K = 2, 16, 64 * 64, 1500
    feat, other = torch.randn(B, C, 64, 64, generator=g), torch.randn(B, C, 64, 64, generator=g)
    values = torch.randn(B, C, K, generator=g)
    idx = torch.randint(0, 40, (B, K), generator=g)  # each of 40 points hit ~37 times
    valid = torch.rand(B, K, generator=g) > 0.2

    def results():
        out = {name: call("cpu") for name, call in _calls(feat, other, values, idx, valid).items()}
        grad = torch.randn(B, C, K, generator=torch.Generator().manual_seed(0))
        out["gather backward"] = torch.ops.fastfuse.gather_points_backward([grad], [], [True], feat, idx, valid,
                                                                           "cpu")[0]
        return out

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = results()
        torch.set_num_threads(max(2, threads))
        many = results()
    finally:
        torch.set_num_threads(threads)
    for name in one:
        assert torch.equal(one[name], many[name]), f"{name} depends on the thread count"


@needs_cpu
def test_auto_picks_the_cpu_kernels_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTFUSE_BACKEND", raising=False)
    for op in SELECT_OPS:
        assert backends.resolve(op, "auto", torch.device("cpu"), 100) == "cpu", op
