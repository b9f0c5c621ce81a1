"""`fastfuse check`: every op × every backend available here against the float64 reference.

Each check runs the public op with the backend under test on inputs of the tested dtype, and the
same op with backend="torch" on float64 copies of *those* inputs (the rounding of the inputs to
fp16/bf16 is not the kernel's error), then compares outputs and the gradients of one random
cotangent. The input generators below follow the documented signatures (docs/design.md); an op registered without a
generator is reported as skipped, never silently passed.

Tolerances are the library's (mamba-ssm's test tolerances, see docs/design.md): `allclose` with
`TOLERANCES[dtype]` for forward outputs and `GRAD_TOLERANCE_SCALE` times looser for gradients,
because a backward pass accumulates over a whole row (the scan over L, the window in SSIM, the
channels in SAM) where the forward error of one element does not. A case may scale both further
for outputs whose magnitude is not O(1) (angles in degrees go to 180).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

import fastfuse
from fastfuse import backends

# (rtol, atol) against the float64 reference: mamba-ssm's tests, docs/design.md "Numerics".
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (6e-4, 2e-3),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (3e-2, 5e-2),
}
GRAD_TOLERANCE_SCALE = 10.0
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}

# How a float64 master tensor becomes a run input: cast to the tested dtype ("data"), or kept in
# fp32 whatever the tested dtype (parameters the contract fixes to fp32: A, D, delta_bias).
DATA, FP32 = "data", "fp32"


@dataclass
class Case:
    """One input configuration of one op."""
    label: str
    build: Callable[[torch.Generator], dict]  # name -> float64/int64 tensor or plain value
    positional: Sequence[str]                 # names passed positionally, in order; the rest by keyword
    grad: Sequence[str] = ()                  # inputs whose gradients are compared
    fp32: Sequence[str] = ()                  # float inputs kept in fp32 whatever the tested dtype
    noncontiguous: Sequence[str] = ()         # inputs given as non-contiguous views
    tol_scale: float = 1.0                    # extra scale on both tolerances (outputs not O(1))
    output_dtype: Optional[torch.dtype] = None  # first output's dtype; None = the tested dtype
    compare: Optional[Callable] = None        # custom comparison of (outputs, reference outputs)


@dataclass
class CheckResult:
    op: str
    backend: str
    dtype: str
    shape: str
    fwd_err: Optional[float] = None
    grad_err: Optional[float] = None
    tolerance: str = ""
    status: str = "PASS"  # PASS, FAIL, ERROR or SKIP
    note: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "ERROR")


# --------------------------------------------------------------------------- input generators

def _rand(g, *shape):
    return torch.rand(shape, generator=g, dtype=torch.float64)


def _randn(g, *shape):
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _unique_indices(g, batch: int, length: int, k: int) -> torch.Tensor:
    return torch.stack([torch.randperm(length, generator=g)[:k] for _ in range(batch)])


def _selective_scan_case(batch, dim, state, length, *, groups=0, with_d=True, with_z=True,
                         softplus=True, last_state=False, label=None) -> Case:
    def build(g):
        bc_shape = (batch, groups, state, length) if groups else (batch, state, length)
        inputs = {
            "u": _randn(g, batch, dim, length),
            "delta": 0.5 * _rand(g, batch, dim, length),
            # A must be negative for a stable scan: -exp(rand), as in mamba-ssm's tests.
            "A": -torch.exp(_rand(g, dim, state)),
            "B": _randn(g, *bc_shape),
            "C": _randn(g, *bc_shape),
            "D": _randn(g, dim) if with_d else None,
            "z": _randn(g, batch, dim, length) if with_z else None,
            "delta_bias": 0.5 * _rand(g, dim),
            "delta_softplus": softplus,
            "return_last_state": last_state,
        }
        return inputs

    grad = ["u", "delta", "A", "B", "C", "delta_bias"] + (["D"] if with_d else []) + (["z"] if with_z else [])
    g_txt = f" G={groups}" if groups else ""
    return Case(label or f"B={batch} D={dim} N={state} L={length}{g_txt}", build,
                positional=("u", "delta", "A", "B", "C"), grad=grad, fp32=("A", "D", "delta_bias"),
                noncontiguous=("delta",) if length > 1 else ())


def _cross_selective_scan_case(batch, dim, height, width, state, rank, *, with_bias=True) -> Case:
    def build(g):
        k = 4
        dt = torch.exp(_rand(g, k, dim) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        return {
            "x": _randn(g, batch, dim, height, width),
            "x_proj_weight": _randn(g, k, rank + 2 * state, dim) / math.sqrt(dim),
            "x_proj_bias": 0.1 * _randn(g, k, rank + 2 * state) if with_bias else None,
            "dt_projs_weight": _randn(g, k, dim, rank) / math.sqrt(rank),
            "dt_projs_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus, VMamba's init
            "A_logs": torch.log(torch.arange(1, state + 1, dtype=torch.float64)).repeat(k * dim, 1)
                      + 0.1 * _rand(g, k * dim, state),
            "Ds": 1.0 + 0.1 * _randn(g, k * dim),
        }

    names = ("x", "x_proj_weight", "x_proj_bias", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")
    grad = [n for n in names if with_bias or n != "x_proj_bias"]
    return Case(f"B={batch} D={dim} H={height} W={width} N={state} R={rank}", build, positional=names,
                grad=grad, fp32=("dt_projs_bias", "A_logs", "Ds"), noncontiguous=("x",))


def _image_pair_case(shape, *, label_extra="", noncontiguous=("y",), **kwargs) -> Case:
    def build(g):
        return {"x": _rand(g, *shape) + 0.05, "y": _rand(g, *shape) + 0.05, **kwargs}

    label = "x".join(map(str, shape)) + (f" {label_extra}" if label_extra else "")
    return Case(label, build, positional=("x", "y"), grad=("x", "y"),
                noncontiguous=noncontiguous if shape[-1] > 1 and shape[-2] > 1 else ())


def _select_case(batch, length, k, *, largest=False) -> Case:
    def build(g):
        # Distinct integer-valued scores: exact in every tested dtype up to L = 256 (bf16), so the
        # k smallest are unambiguous; beyond that ties appear and the contract's tie rule decides.
        score = torch.stack([torch.randperm(length, generator=g) for _ in range(batch)]).double()
        return {"score": score, "k": k, "largest": largest}

    return Case(f"B={batch} L={length} k={k}{' largest' if largest else ''}", build,
                positional=("score", "k"), output_dtype=torch.int64)


def _select_capacity_case(batch, length, capacity) -> Case:
    def build(g):
        score = torch.stack([torch.randperm(length, generator=g) for _ in range(batch)]).double()
        ks = torch.randint(0, capacity + 1, (batch,), generator=g)
        return {"score": score, "k": ks, "capacity": capacity}

    def compare(outs, refs):
        # Slots past each row's k are unspecified: compare the mask, and indices where valid.
        idx, valid = outs[0].cpu(), outs[1].cpu().bool()
        ref_idx, ref_valid = refs[0].cpu(), refs[1].cpu().bool()
        mismatches = int((valid != ref_valid).sum()) + int(((idx != ref_idx) & ref_valid).sum())
        return float(mismatches), mismatches == 0

    return Case(f"B={batch} L={length} k=tensor capacity={capacity}", build, positional=("score", "k"),
                output_dtype=torch.int64, compare=compare)


def _gather_case(batch, channels, spatial, k) -> Case:
    def build(g):
        length = math.prod(spatial)
        return {"feat": _randn(g, batch, channels, *spatial), "idx": _unique_indices(g, batch, length, k)}

    return Case(f"feat {batch}x{channels}x{'x'.join(map(str, spatial))} K={k}", build,
                positional=("feat", "idx"), grad=("feat",), noncontiguous=("feat",) if len(spatial) == 2 else ())


def _scatter_case(batch, channels, spatial, k, reduce) -> Case:
    def build(g):
        length = math.prod(spatial)
        return {"base": _randn(g, batch, channels, *spatial), "values": _randn(g, batch, channels, k),
                "idx": _unique_indices(g, batch, length, k), "reduce": reduce}

    return Case(f"base {batch}x{channels}x{'x'.join(map(str, spatial))} K={k} {reduce}", build,
                positional=("base", "values", "idx"), grad=("base", "values"))


def _spectral_response_case(batch, bands, height, width, out_bands) -> Case:
    def build(g):
        r = _rand(g, out_bands, bands)
        return {"z": _rand(g, batch, bands, height, width), "R": r / r.sum(1, keepdim=True)}

    return Case(f"{batch}x{bands}x{height}x{width} -> {out_bands}", build, positional=("z", "R"),
                grad=("z", "R"), noncontiguous=("z",))


def _spatial_degrade_case(batch, bands, height, width, ksize, ratio, padding, *, per_band=False) -> Case:
    def build(g):
        kernel = _rand(g, *((bands,) if per_band else ()), ksize, ksize)
        kernel = kernel / kernel.sum((-1, -2), keepdim=True)
        return {"z": _rand(g, batch, bands, height, width), "kernel": kernel, "ratio": ratio, "padding": padding}

    kind = f"{bands}x{ksize}x{ksize}" if per_band else f"{ksize}x{ksize}"
    return Case(f"{batch}x{bands}x{height}x{width} k={kind} r={ratio} {padding}", build,
                positional=("z", "kernel", "ratio"), grad=("z", "kernel"), noncontiguous=("z",))


def _pair_case(label, build, positional, grad, **kw) -> Case:
    return Case(label, build, positional=positional, grad=grad, **kw)


def _adjoint_case(batch, bands, size, ksize, ratio, padding) -> Case:
    low = (size[0] // ratio, size[1] // ratio)

    def build(g):
        kernel = _rand(g, ksize, ksize)
        return {"x": _rand(g, batch, bands, *low), "kernel": kernel / kernel.sum(), "ratio": ratio,
                "size": list(size), "padding": padding}

    return Case(f"{batch}x{bands}x{low[0]}x{low[1]} -> {size[0]}x{size[1]} k={ksize} r={ratio} {padding}", build,
                positional=("x", "kernel", "ratio", "size"), grad=("x", "kernel"), noncontiguous=("x",))


def _degrade_sam_case(batch, bands, side, ksize, ratio, padding) -> Case:
    def build(g):
        kernel = _rand(g, ksize, ksize)
        return {"z": _rand(g, batch, bands, side, side) + 0.05, "kernel": kernel / kernel.sum(), "ratio": ratio,
                "x": _rand(g, batch, bands, side // ratio, side // ratio) + 0.05, "padding": padding}

    # The SAM map is in degrees (up to 180): tolerances scaled as for sam_map.
    return Case(f"{batch}x{bands}x{side}x{side} k={ksize} r={ratio} {padding}", build,
                positional=("z", "kernel", "ratio", "x"), grad=("z", "kernel", "x"), tol_scale=10.0)


def _response_ssim_case(batch, bands, side, out_bands, window, padding) -> Case:
    def build(g):
        r = _rand(g, out_bands, bands)
        return {"z": _rand(g, batch, bands, side, side), "R": r / r.sum(1, keepdim=True),
                "y": _rand(g, batch, out_bands, side, side), "window_size": window, "padding": padding}

    return Case(f"{batch}x{bands}x{side}x{side} -> {out_bands} w={window} {padding}", build,
                positional=("z", "R", "y"), grad=("z", "R", "y"), noncontiguous=("y",))


def _two_map_case(op, batch, channels, spatial, k) -> Case:
    """gather_sum_points(a, b, idx) / add_scatter_points(base1, base2, values, idx)."""
    length = math.prod(spatial)
    first, second = ("a", "b") if op == "gather_sum_points" else ("base1", "base2")

    def build(g):
        inputs = {first: _randn(g, batch, channels, *spatial), second: _randn(g, batch, channels, *spatial)}
        if op == "add_scatter_points":
            inputs["values"] = _randn(g, batch, channels, k)
        inputs["idx"] = _unique_indices(g, batch, length, k)
        return inputs

    positional = (first, second, "idx") if op == "gather_sum_points" else (first, second, "values", "idx")
    grad = tuple(n for n in positional if n != "idx")
    return Case(f"{batch}x{channels}x{'x'.join(map(str, spatial))} K={k}", build, positional=positional, grad=grad,
                noncontiguous=(second,) if len(spatial) == 2 else ())


def _cases(op: str, quick: bool) -> Optional[list[Case]]:
    """The input cases of `op` (small, awkward, degenerate; larger ones unless quick), or None.

    Quick cases are smaller where the Triton interpreter is slow (2-D blurs, the fused scan), so
    that `fastfuse check --quick` covers every op and backend in well under a minute on CPU.
    """
    if op == "selective_scan":
        cases = [_selective_scan_case(2, 4, 8, 64 if not quick else 32),
                 _selective_scan_case(1, 6, 5, 37 if not quick else 19, groups=2, with_d=False, with_z=False,
                                      softplus=False, last_state=True),
                 _selective_scan_case(1, 3, 4, 1, label="B=1 D=3 N=4 L=1 (L=1)")]
        if not quick:
            cases.append(_selective_scan_case(2, 8, 16, 300, last_state=True))
    elif op == "cross_scan":
        def scan(shape):
            return Case("x".join(map(str, shape)), lambda g: {"x": _randn(g, *shape)}, positional=("x",),
                        grad=("x",), noncontiguous=("x",) if shape[-1] > 1 else ())
        cases = [scan((2, 3, 8, 8)), scan((1, 5, 7, 3)), scan((1, 2, 1, 1))]
    elif op == "cross_merge":
        def merge(shape):
            return Case("x".join(map(str, shape)), lambda g: {"ys": _randn(g, *shape)}, positional=("ys",),
                        grad=("ys",), noncontiguous=("ys",) if shape[-1] > 1 else ())
        cases = [merge((2, 4, 3, 8, 8)), merge((1, 4, 5, 7, 3)), merge((1, 4, 2, 1, 1))]
    elif op == "cross_selective_scan":
        if quick:
            cases = [_cross_selective_scan_case(1, 4, 3, 4, 2, 1),
                     _cross_selective_scan_case(1, 3, 2, 3, 3, 1, with_bias=False)]
        else:
            cases = [_cross_selective_scan_case(1, 8, 5, 6, 4, 2),
                     _cross_selective_scan_case(2, 6, 3, 7, 3, 1, with_bias=False),
                     _cross_selective_scan_case(1, 16, 9, 9, 16, 1)]
    elif op in ("ssim_map", "ssim"):
        cases = [_image_pair_case((2, 3, 16, 16)),
                 _image_pair_case((1, 1, 13, 17), label_extra="reflect", padding="reflect", window_size=7),
                 _image_pair_case((1, 2, 5, 4), label_extra="zero", padding="zero")]
        if not quick:
            cases.append(_image_pair_case((2, 4, 45, 37), label_extra="valid", padding="valid"))
    elif op == "sam_map":
        cases = [_image_pair_case((2, 31, 5, 7)), _image_pair_case((1, 3, 33, 17)),
                 _image_pair_case((1, 1, 1, 1))]
        cases = [Case(c.label, c.build, c.positional, c.grad, noncontiguous=c.noncontiguous, tol_scale=10.0)
                 for c in cases]  # degrees: outputs up to 180, not O(1)
    elif op == "select_points":
        cases = [_select_case(2, 64, 9), _select_case(1, 37, 5, largest=True), _select_case(3, 1, 1),
                 _select_capacity_case(2, 50, 7)]
    elif op == "gather_points":
        cases = [_gather_case(2, 3, (8, 8), 10), _gather_case(1, 5, (37,), 7), _gather_case(1, 1, (1, 1), 1)]
    elif op == "scatter_points":
        cases = [_scatter_case(2, 3, (8, 8), 10, "add"), _scatter_case(1, 5, (37,), 7, "replace"),
                 _scatter_case(1, 2, (1, 1), 1, "add")]
    elif op in ("gather_sum_points", "add_scatter_points"):
        cases = [_two_map_case(op, 2, 3, (8, 8), 10), _two_map_case(op, 1, 5, (37,), 7),
                 _two_map_case(op, 1, 1, (1, 1), 1)]
    elif op == "spectral_response":
        cases = [_spectral_response_case(2, 31, 8, 8, 3), _spectral_response_case(1, 5, 7, 3, 2)]
    elif op == "spectral_response_ssim":
        cases = [_response_ssim_case(1, 8, 12, 3, 5, "valid"), _response_ssim_case(2, 5, 9, 2, 3, "reflect")]
    elif op == "spatial_degrade":
        if quick:
            cases = [_spatial_degrade_case(1, 2, 8, 8, 4, 2, "circular"),
                     _spatial_degrade_case(1, 3, 9, 6, 3, 2, "reflect", per_band=True),
                     _spatial_degrade_case(1, 2, 9, 9, 3, 3, "zero")]
        else:
            cases = [_spatial_degrade_case(2, 4, 16, 16, 8, 4, "circular"),
                     _spatial_degrade_case(1, 3, 18, 10, 5, 2, "reflect", per_band=True),
                     _spatial_degrade_case(1, 2, 9, 9, 3, 3, "zero")]
    elif op == "spatial_degrade_adjoint":
        cases = [_adjoint_case(1, 2, (8, 8), 4, 2, "circular"), _adjoint_case(1, 3, (9, 7), 3, 3, "zero")]
    elif op == "spatial_degrade_sam":
        cases = [_degrade_sam_case(1, 4, 8, 4, 2, "circular"), _degrade_sam_case(2, 3, 9, 3, 3, "reflect")]
        if quick:
            cases = [_degrade_sam_case(1, 3, 6, 3, 2, "circular"), _degrade_sam_case(1, 2, 7, 3, 3, "reflect")]
    elif op == "channel_attention":
        cases = [_channel_attention_case((2, 8, 5, 7), heads=2), _channel_attention_case((1, 3, 1, 9), heads=1),
                 _channel_attention_case((1, 6, 11), heads=3)]
    elif op == "subspace_guidance":
        cases = [_subspace_guidance_case(1, 9, 3, 8, 2), _subspace_guidance_case(2, 5, 2, 6, 3)]
    else:
        return None
    return cases


def _channel_attention_case(shape, heads: int) -> Case:
    def build(g):
        return {name: torch.randn(shape, generator=g, dtype=torch.float64) for name in ("q", "k", "v")} | \
            {"heads": heads}

    return Case(f"{'x'.join(map(str, shape))} heads={heads}", build, positional=("q", "k", "v"),
                grad=("q", "k", "v"), noncontiguous=("k",))


def _subspace_guidance_case(batch, bands, rank, size, ratio) -> Case:
    # A gradient itself (forward only): the loss and both gradients are compared, each O(size²).
    def build(g):
        R = torch.rand(3, bands, generator=g, dtype=torch.float64)
        return {"A": torch.rand(batch, rank, size, size, generator=g, dtype=torch.float64),
                "E": torch.rand(bands, rank, generator=g, dtype=torch.float64),
                "R": R / R.sum(1, keepdim=True),
                "X": torch.rand(batch, bands, size // ratio, size // ratio, generator=g, dtype=torch.float64),
                "Y": torch.rand(batch, 3, size, size, generator=g, dtype=torch.float64),
                "kernel": torch.rand(3, 3, generator=g, dtype=torch.float64) / 4.5, "ratio": ratio, "lam": 0.5}

    return Case(f"B={batch} C={bands} d={rank} {size}x{size} r={ratio}", build,
                positional=("A", "E", "R", "X", "Y", "kernel", "ratio", "lam"), tol_scale=10.0,
                output_dtype=torch.float32)   # the loss is accumulated and returned in fp32


# --------------------------------------------------------------------------- running one check

def _flat(out) -> list:
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return [out] if isinstance(out, torch.Tensor) else []


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    if t.dim() < 2:
        return t
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _call(fn, case: Case, values: dict, backend: str):
    args = [values[name] for name in case.positional]
    kwargs = {k: v for k, v in values.items() if k not in case.positional and v is not None}
    return fn(*args, **kwargs, backend=backend)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> tuple[float, bool]:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        return math.inf, False
    if a.numel() == 0:
        return 0.0, True
    # The quantity isclose compares, |a − e| / (atol + rtol·|e|): a case passes when its worst
    # element is ≤ 1, and that worst ratio is what the table prints.
    ratio = (a - e).abs() / (atol + rtol * e.abs())
    both_nan = a.isnan() & e.isnan()
    same_inf = torch.isinf(a) & (a == e)
    ratio = torch.where(both_nan | same_inf, torch.zeros_like(ratio), ratio.nan_to_num(nan=math.inf))
    worst = float(ratio.max())
    return worst, worst <= 1.0


def _compare_outputs(outs, refs, rtol, atol) -> tuple[float, bool]:
    if len(outs) != len(refs):
        return math.inf, False
    worst, ok = 0.0, True
    for out, ref in zip(outs, refs):
        if out.is_floating_point():
            err, good = _close(out, ref, rtol, atol)
        else:  # indices, counts and masks must match exactly
            same_shape = out.shape == ref.shape
            err = float((out.cpu() != ref.cpu()).sum()) if same_shape else math.inf
            good = same_shape and err == 0
        worst, ok = max(worst, err), ok and good
    return worst, ok


def run_case(op: str, backend: str, dtype: torch.dtype, device: str, case: Case, seed: int = 0) -> CheckResult:
    dtype_name = next(k for k, v in DTYPE_NAMES.items() if v == dtype)
    rtol, atol = (s * case.tol_scale for s in TOLERANCES[dtype])
    result = CheckResult(op, backend, dtype_name, case.label,
                         tolerance=f"{rtol:.0e}/{atol:.0e}" + (f" (grad x{GRAD_TOLERANCE_SCALE:g})" if case.grad else ""))
    start = time.perf_counter()
    try:
        _run_case(op, backend, dtype, device, case, seed, rtol, atol, result)
    except Exception as exc:  # a kernel that raises on valid input is a failure, reported not raised
        result.status, result.note = "ERROR", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    result.seconds = time.perf_counter() - start
    return result


def _run_case(op, backend, dtype, device, case, seed, rtol, atol, result) -> None:
    fn = getattr(fastfuse, op)
    g = torch.Generator().manual_seed(seed)
    master = case.build(g)
    run, ref = {}, {}
    for name, value in master.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                value = value.to(torch.float32 if name in case.fp32 else dtype)
            value = value.to(device)
            if name in case.noncontiguous:
                value = _non_contiguous(value)
            # The reference sees exactly the values the backend sees, in float64.
            ref_value = value.detach().cpu()
            ref_value = ref_value.double() if ref_value.is_floating_point() else ref_value
            if name in case.grad:
                value.requires_grad_(True)
                ref_value.requires_grad_(True)
            run[name], ref[name] = value, ref_value
        else:
            run[name] = ref[name] = value
    outs = _flat(_call(fn, case, run, backend))
    refs = _flat(_call(fn, case, ref, "torch"))
    expect_dtype = case.output_dtype or dtype
    if outs and outs[0].dtype != expect_dtype:
        result.status = "FAIL"
        result.note = f"output dtype {outs[0].dtype} (expected {expect_dtype})"
    if case.compare is not None:
        result.fwd_err, ok = case.compare(outs, refs)
    else:
        result.fwd_err, ok = _compare_outputs(outs, refs, rtol, atol)
    if not ok:
        result.status = "FAIL"
    if case.grad:
        grad_err, grad_ok = _compare_gradients(case, run, ref, outs, refs, rtol, atol, g)
        result.grad_err = grad_err
        if not grad_ok:
            result.status = "FAIL"


def _compare_gradients(case, run, ref, outs, refs, rtol, atol, g) -> tuple[float, bool]:
    pairs = [(o, r) for o, r in zip(outs, refs) if o.is_floating_point() and o.requires_grad]
    if not pairs:
        return math.inf, False  # the op claims to be differentiable in case.grad but its output is not
    cotangents = [torch.randn(r.shape, generator=g, dtype=torch.float64) for _, r in pairs]
    names = [n for n in case.grad if run.get(n) is not None]
    run_grads = torch.autograd.grad([o for o, _ in pairs], [run[n] for n in names],
                                    [c.to(o.device, o.dtype) for c, (o, _) in zip(cotangents, pairs)],
                                    allow_unused=True)
    ref_grads = torch.autograd.grad([r for _, r in pairs], [ref[n] for n in names], cotangents, allow_unused=True)
    worst, ok = 0.0, True
    for name, got, want in zip(names, run_grads, ref_grads):
        got = torch.zeros_like(run[name]) if got is None else got
        want = torch.zeros_like(ref[name]) if want is None else want
        if got.dtype != run[name].dtype:
            return math.inf, False  # a gradient must come back in its input's dtype
        err, good = _close(got, want, rtol * GRAD_TOLERANCE_SCALE, atol * GRAD_TOLERANCE_SCALE)
        worst, ok = max(worst, err), ok and good
    return worst, ok


# --------------------------------------------------------------------------- the runner

def default_dtypes(device: str, quick: bool) -> list[torch.dtype]:
    if quick:
        return [torch.float32, torch.bfloat16]
    return [torch.float32, torch.float16, torch.bfloat16]


def run_checks(device: str = "cpu", *, quick: bool = False, ops: Optional[Sequence[str]] = None,
               backend_names: Optional[Sequence[str]] = None, dtypes: Optional[Sequence[torch.dtype]] = None,
               progress: Optional[Callable[[CheckResult], None]] = None) -> list[CheckResult]:
    """Run every check; returns one result per (op, backend, dtype, case), skipped ones included."""
    from fastfuse.info import import_families

    results: list[CheckResult] = []

    def record(r: CheckResult) -> None:
        results.append(r)
        if progress is not None:
            progress(r)

    for fam in import_families():
        if fam.state == "error":
            record(CheckResult(f"[{fam.family}]", "-", "-", "-", status="ERROR",
                               note=f"family failed to import: {fam.detail}"[:300]))
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("fastfuse check: --device cuda was asked for but no CUDA device is available")
    dtypes = list(dtypes) if dtypes else default_dtypes(device, quick)
    for op in ops or ():
        if op not in backends.registered_ops():
            record(CheckResult(op, "-", "-", "-", status="ERROR",
                               note=f"not a registered op (registered: {', '.join(backends.registered_ops())})"))
    for op in backends.registered_ops():
        if ops and op not in ops:
            continue
        cases = _cases(op, quick)
        if cases is None:
            record(CheckResult(op, "-", "-", "-", status="SKIP",
                               note="no input generator in fastfuse.check for this op (add one to _cases)"))
            continue
        if not hasattr(fastfuse, op):
            record(CheckResult(op, "-", "-", "-", status="SKIP", note="registered but not a public fastfuse name"))
            continue
        for backend in backends.BACKENDS:
            if backend_names and backend not in backend_names:
                continue
            reason = backends.unavailable_reason(op, backend, torch.device(device))
            if reason is not None:
                record(CheckResult(op, backend, "-", "-", status="SKIP", note=reason))
                continue
            for dtype in dtypes:
                for seed, case in enumerate(cases):
                    record(run_case(op, backend, dtype, device, case, seed))
    return results


def _fmt_err(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value == math.inf:
        return "inf"
    return f"{value:.2e}"


def format_table(results: Sequence[CheckResult], *, show_skipped: bool = True, failures_only: bool = False) -> str:
    """One row per result. The error columns are the worst |out − ref| / (atol + rtol·|ref|) over
    the elements (≤ 1 passes; grad tolerances are the forward ones times GRAD_TOLERANCE_SCALE)."""
    header = ("op", "backend", "dtype", "shape", "fwd err/tol", "grad err/tol", "tolerance (rtol/atol)", "result")
    rows = [header]
    notes: dict[str, int] = {}
    for r in results:
        if (r.status == "SKIP" and not show_skipped) or (failures_only and not r.failed):
            continue
        status = r.status
        if r.note:
            status += f" [{notes.setdefault(r.note, len(notes) + 1)}]"
        rows.append((r.op, r.backend, r.dtype, r.shape, _fmt_err(r.fwd_err), _fmt_err(r.grad_err),
                     r.tolerance or "-", status))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if notes:
        lines.append("")
        lines.extend(f"[{i}] {note}" for note, i in notes.items())
    lines.append("")
    lines.append("err/tol: the worst |out − ref| / (atol + rtol·|ref|) over all elements, ≤ 1 passes "
                 "(for index outputs: the number of mismatches, 0 passes)")
    return "\n".join(lines)


def summary(results: Sequence[CheckResult]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "ERROR", "SKIP")}
    seconds = sum(r.seconds for r in results)
    return (f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['ERROR']} errors, "
            f"{counts['SKIP']} skipped ({seconds:.1f} s of checks)")
