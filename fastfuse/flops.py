"""FLOP formulas for fastfuse's custom ops, and FLOP/parameter counting of whole models.

Counting runs the model once under `torch.utils.flop_counter.FlopCounterMode`. Our ops reach that
mode as single `torch.ops.fastfuse.*` calls (their kernels run below it and are not seen), so each
needs a formula; they are registered with `register_flop_formula` for every fastfuse op that
exists when `register_flop_formulas()` runs — at import of this module (which first imports every
op family it can) and again at the start of `count_flops`, so a family imported later is covered
too. A plain `FlopCounterMode` a user opens after `import fastfuse.flops` therefore counts our ops.

Conventions (what a "FLOP" is) — the papers disagree, so the caller names one:

* ``torch``  — FlopCounterMode's own: a multiply-add of a matmul/conv/attention is 2 FLOPs; our ops
  count 2 per multiply-add plus their other arithmetic (``pointwise`` below); the selective scan
  counts its mamba-ssm formula. Elementwise aten ops (norms, activations) are not counted (torch
  has no formula for them).
* ``vmamba`` — fvcore as VMamba uses it: "FLOPs" are multiply-accumulates (MACs) of every matmul,
  einsum, linear and conv (aten counts halved, attention matmuls included); the selective scan
  counts 9·B·L·D·N + B·D·L (D skip) + B·D·L (z gate) exactly as VMamba's fvcore handle does (mamba
  issue #110); cross_selective_scan counts the unfused pipeline: both projections as MACs plus the
  4-direction scan with D, no z; our other ops count their multiply-accumulates (``macs`` below:
  SSIM windows, SAM dot products, spectral response, blur), while data movement (cross scan/merge,
  gather, select) and ``pointwise`` work count 0, as fvcore ignores elementwise ops.
* ``paper``  — SRLF-Net's (supplement §7.2): MACs of convolution and linear layers, the Mamba scan
  by issue #110, and *not* the attention matrix. At the aten level a matmul or conv counts only
  when one operand shares storage with a model parameter (a weight layer: nn.Linear, nn.ConvNd,
  VMamba's einsum projections); matmuls between two activations (q·kᵀ, attn·v, SDPA) count 0. A
  weight cast to another dtype inside forward gets new storage and is then missed (run the model
  in its parameters' dtype). SSIM and SAM maps use SRLF eq. (10): C·(5k² + 10)·H·W and
  (2C + 6)·H·W per image; the observation model (spectral response, blur + decimation) counts 0,
  as SRLF ignores it ("downsampling ... is common").

Per-op formulas (B batch, C/D channels, L = H·W positions, N state size, k window/kernel size);
``macs`` are multiply-accumulates, ``scan`` the mamba-ssm count, ``pointwise`` other arithmetic:

* selective_scan: scan = 9·B·L·D·N + B·D·L if D is given + B·D·L if z is given (softplus and
  delta_bias are ignored, as in mamba issue #110 and VMamba's handle).
* cross_selective_scan (K = 4 directions, R dt rank): macs = B·L·K·(R+2N)·D (x_proj) + B·L·K·D·R
  (dt_proj); scan = 9·B·L·(K·D)·N + B·(K·D)·L; pointwise = B·L·K·(R+2N) bias adds (if a bias is
  given) + 3·B·D·L (merging 4 directions).
* cross_scan: 0 (a permutation). cross_merge: pointwise = 3·B·C·L.
* ssim_map / ssim (output H'×W'): macs = 5·k²·B·C·H'·W' (five k×k Gaussian window sums: μx, μy,
  E[x²], E[y²], E[xy]); pointwise = 20·B·C·H'·W' (3 input products, μx², μy², μxμy, 3 variances,
  5 for the numerator, 5 for the denominator, 1 division); ssim adds B·C·H'·W' for the mean.
  paper: B·C·(5k² + 10)·H'·W'.
* sam_map: macs = 3·B·C·H·W (x·y, ‖x‖², ‖y‖²); pointwise = 6·B·H·W (2 square roots, a product,
  a division, the angle, the scaling to degrees). paper: B·(2C + 6)·H·W.
* channel_attention (per head Cq' × Ck' channels over L pixels): macs = 2·B·h·Cq'·Ck'·L (the Gram
  matrix and the apply) + B·(Cq + Ck)·L (row norms, when normalising); pointwise = 5·B·h·Cq'·Ck'
  (rescaling and softmax). paper: 0 (attention between activations).
* select_points, gather_points: 0 (comparisons and copies). scatter_points: pointwise = B·C·K
  adds for reduce="add", 0 for "replace".
* spectral_response: macs = B·c·C·H·W. paper: 0.
* spatial_degrade (output h×w, kernel k×k): macs = B·C·h·w·k² (the blur is evaluated only at the
  kept pixels). spatial_degrade_adjoint: the same, from its low-resolution input. paper: 0.
* Fused forms: spectral_response_ssim = spectral_response + ssim_map of its output against y;
  spatial_degrade_sam = spatial_degrade + sam_map on the degraded image; gather_sum_points:
  pointwise = B·C·K (the sum, at the gathered points only); add_scatter_points: pointwise =
  B·C·L + B·C·K (base1 + base2, plus the scattered adds).

Backward: every `<op>_backward` custom op counts 2× its forward formula (the usual "backward ≈ 2×
forward" convention, which is also what FlopCounterMode's matmul formulas give: one matmul
forward, two backward), except the backward of gather_points and scatter_points, which is data
movement (0). Neither mamba-ssm nor VMamba/fvcore define a backward count; papers report forward.

`count_flops` counts one forward call under torch.no_grad(). The model may be any callable; only
an nn.Module has parameters, so under ``paper`` a plain function's matmuls and convs count 0.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

CONVENTIONS = ("torch", "paper", "vmamba")
CONVENTION_HELP = {
    "torch": "FlopCounterMode: 2 FLOPs per multiply-add; fastfuse ops by their arithmetic",
    "paper": "SRLF-Net: MACs of conv/linear weight layers + Mamba scan (mamba#110); no attention matrix",
    "vmamba": "VMamba's fvcore: MACs of all matmul/einsum/conv + selective-scan handle (mamba#110)",
}


@dataclass(frozen=True)
class OpCount:
    """An op's work, split so that every convention can be read from it."""
    macs: int = 0
    scan: int = 0
    pointwise: int = 0
    paper: Optional[int] = None  # SRLF-Net's own formula, where it has one

    def total(self, convention: str) -> int:
        if convention == "torch":
            return 2 * self.macs + self.scan + self.pointwise
        if convention == "vmamba":
            return self.macs + self.scan
        if convention == "paper":
            return self.macs + self.scan if self.paper is None else self.paper
        raise ValueError(f"fastfuse.flops: convention must be one of {CONVENTIONS}, got {convention!r}")

    def __add__(self, other: "OpCount") -> "OpCount":
        paper = None if self.paper is None and other.paper is None else \
            self.total("paper") + other.total("paper")
        return OpCount(self.macs + other.macs, self.scan + other.scan, self.pointwise + other.pointwise, paper)

    def scaled(self, factor: int) -> "OpCount":
        return OpCount(factor * self.macs, factor * self.scan, factor * self.pointwise,
                       None if self.paper is None else factor * self.paper)


class _Args:
    """A custom op's arguments by schema name; empty tensors (absent optionals) read as None."""

    def __init__(self, names: Sequence[str], args: tuple, kwargs: dict, out: Any):
        self.values = dict(zip(names, args))
        self.values.update(kwargs)
        self.out = out

    def get(self, *names: str, default=None):
        for name in names:
            value = self.values.get(name)
            if isinstance(value, torch.Tensor) and value.numel() == 0:
                value = None
            if value is not None:
                return value
        return default

    def shape(self, *names: str) -> Optional[tuple]:
        value = self.get(*names)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    def need(self, *names: str) -> tuple:
        shape = self.shape(*names)
        if shape is None:
            raise KeyError(f"none of the arguments {names} is present")
        return shape

    def out_shapes(self) -> list[tuple]:
        outs = self.out if isinstance(self.out, (tuple, list)) else [self.out]
        return [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]


# --------------------------------------------------------------------------- per-op formulas

def selective_scan_count(batch: int, dim: int, length: int, state: int, *, with_d: bool = True,
                         with_z: bool = False) -> OpCount:
    """mamba-ssm issue #110 / VMamba's flops_selective_scan_fn: 9·B·L·D·N (+B·D·L for D, z)."""
    scan = 9 * batch * length * dim * state + batch * dim * length * (int(with_d) + int(with_z))
    return OpCount(scan=scan)


def cross_selective_scan_count(batch: int, dim: int, length: int, state: int, rank: int, *,
                               directions: int = 4, with_bias: bool = False, with_d: bool = True) -> OpCount:
    proj = rank + 2 * state
    macs = batch * length * directions * proj * dim + batch * length * directions * dim * rank
    scan = selective_scan_count(batch, directions * dim, length, state, with_d=with_d).scan
    pointwise = (batch * length * directions * proj if with_bias else 0) + (directions - 1) * batch * dim * length
    return OpCount(macs=macs, scan=scan, pointwise=pointwise)


def ssim_map_count(batch: int, channels: int, out_h: int, out_w: int, window: int) -> OpCount:
    pixels = batch * channels * out_h * out_w
    return OpCount(macs=5 * window * window * pixels, pointwise=20 * pixels,
                   paper=pixels * (5 * window * window + 10))


def sam_map_count(batch: int, channels: int, height: int, width: int) -> OpCount:
    pixels = batch * height * width
    return OpCount(macs=3 * channels * pixels, pointwise=6 * pixels, paper=pixels * (2 * channels + 6))


def spectral_response_count(batch: int, bands: int, out_bands: int, height: int, width: int) -> OpCount:
    return OpCount(macs=batch * out_bands * bands * height * width, paper=0)


def spatial_degrade_count(batch: int, bands: int, out_h: int, out_w: int, ksize: int) -> OpCount:
    return OpCount(macs=batch * bands * out_h * out_w * ksize * ksize, paper=0)


def _map_hw(a: _Args, *names: str) -> tuple[int, int, int]:
    """(H', W', window) of the SSIM map computed on the image argument `names`."""
    h, w = a.need(*names)[-2:]
    window = int(a.get("window_size", "win_size", default=11))
    if a.get("padding", default="valid") == "valid":
        h, w = h - window + 1, w - window + 1
    return max(h, 0), max(w, 0), window


def _low_res(a: _Args, grad_name: str) -> tuple[int, int]:
    """Spatial size of a degraded image: the incoming gradient's in a backward op (the first of its
    `grads` list, the gradient of the degraded output), else the output's."""
    grads = a.get("grads")
    shape = (tuple(grads[0].shape) if isinstance(grads, (list, tuple)) and grads else None) or a.shape(grad_name) \
        or a.out_shapes()[0]
    return shape[-2], shape[-1]


def _f_selective_scan(a: _Args) -> OpCount:
    batch, dim, length = a.need("u")
    state = a.need("A")[-1]
    return selective_scan_count(batch, dim, length, state, with_d=a.get("D") is not None,
                                with_z=a.get("z") is not None)


def _f_cross_selective_scan(a: _Args) -> OpCount:
    x = a.need("x")  # (B, D, H, W), or (B, H, W, D) when channel_last
    directions, proj, dim = a.need("x_proj_weight")
    rank = a.need("dt_projs_weight")[-1]
    state = a.need("A_logs")[-1]
    batch = x[0]
    return cross_selective_scan_count(batch, dim, math.prod(x) // (batch * dim), state, rank, directions=directions,
                                      with_bias=a.get("x_proj_bias") is not None, with_d=a.get("Ds") is not None)


def _f_cross_merge(a: _Args) -> OpCount:
    # (B, 4, C, H, W) or channel-last: every output element sums 4 directions, 3 adds.
    numel = math.prod(a.need("ys", "y", "x"))
    return OpCount(pointwise=3 * numel // 4)


def _f_ssim_map(a: _Args) -> OpCount:
    batch, channels = a.need("x", "img1", "input")[:2]
    h, w, window = _map_hw(a, "x", "img1", "input")
    return ssim_map_count(batch, channels, h, w, window)


def _f_ssim(a: _Args) -> OpCount:
    batch, channels = a.need("x", "img1", "input")[:2]
    h, w, _ = _map_hw(a, "x", "img1", "input")
    return _f_ssim_map(a) + OpCount(pointwise=batch * channels * h * w)


def _f_sam_map(a: _Args) -> OpCount:
    return sam_map_count(*a.need("x"))


def _f_scatter_points(a: _Args) -> OpCount:
    batch, channels, k = a.need("values", "src")
    reduce = a.get("reduce", default="add")
    return OpCount(pointwise=batch * channels * k if reduce == "add" else 0)


def _f_gather_sum_points(a: _Args) -> OpCount:
    shapes = a.out_shapes()
    return OpCount(pointwise=math.prod(shapes[0]) if shapes else 0)


def _f_add_scatter_points(a: _Args) -> OpCount:
    shapes = a.out_shapes()
    base = math.prod(shapes[0]) if shapes else 0
    values = a.shape("values", "src")
    return OpCount(pointwise=base + (math.prod(values) if values else 0))


def _f_spectral_response(a: _Args) -> OpCount:
    batch, bands, h, w = a.need("z", "x")
    out_bands = a.need("R", "srf", "response")[0]
    return spectral_response_count(batch, bands, out_bands, h, w)


def _kernel_size(a: _Args) -> int:
    return a.need("kernel", "psf", "k")[-1]


def _f_spatial_degrade(a: _Args) -> OpCount:
    batch, bands = a.need("z", "x")[:2]
    h, w = _low_res(a, "grad")
    return spatial_degrade_count(batch, bands, h, w, _kernel_size(a))


def _f_spatial_degrade_adjoint(a: _Args) -> OpCount:
    batch, bands, h, w = a.need("y", "x", "z")
    return spatial_degrade_count(batch, bands, h, w, _kernel_size(a))


def _f_spectral_response_ssim(a: _Args) -> OpCount:
    batch, bands, h, w = a.need("z")
    out_bands = a.need("R", "srf", "response")[0]
    map_h, map_w, window = _map_hw(a, "y")
    return (spectral_response_count(batch, bands, out_bands, h, w)
            + ssim_map_count(batch, out_bands, map_h, map_w, window))


def _f_spatial_degrade_sam(a: _Args) -> OpCount:
    batch, bands = a.need("z")[:2]
    h, w = _low_res(a, "grad_x_pseudo")
    return spatial_degrade_count(batch, bands, h, w, _kernel_size(a)) + sam_map_count(batch, bands, h, w)


def _f_channel_attention(a: _Args) -> OpCount:
    """Per head the Gram matrix Q Kᵀ and the apply A V (Cq'·Ck'·L multiply-adds each), the row norms
    when normalising; the C × C softmax and rescaling as pointwise. paper: 0 (an attention matrix
    between activations, which SRLF's convention leaves out)."""
    batch, cq = a.need("q")[:2]
    ck = a.need("k")[1]
    length = math.prod(a.need("q")[2:])
    heads = int(a.get("heads", default=1))
    pairs = batch * heads * (cq // heads) * (ck // heads)
    norms = batch * (cq + ck) * length if a.get("normalize", default=True) else 0
    return OpCount(macs=2 * pairs * length + norms, pointwise=5 * pairs, paper=0)


def _f_subspace_guidance(a: _Args) -> OpCount:
    """The closed form's multiply-adds (shared kernel): the spectral term's R·E, r_Y and its two
    products; the spatial term's H(A) and adjoint at d bands, the mixing by E and its two products."""
    batch, d, h_full, w_full = a.need("A")
    bands = a.need("E")[-2]
    msi = a.need("R")[0]
    k = _kernel_size(a)
    ratio = int(a.get("ratio", default=1))
    low = batch * (h_full // ratio) * (w_full // ratio)
    spectral = 2 * msi * bands * d + 3 * batch * h_full * w_full * msi * d
    spatial = 2 * low * d * k * k + 3 * low * bands * d
    return OpCount(macs=spectral + spatial, pointwise=batch * h_full * w_full * msi + low * bands)


FORMULAS: dict[str, Callable[[_Args], OpCount]] = {
    "selective_scan": _f_selective_scan,
    "cross_selective_scan": _f_cross_selective_scan,
    "cross_scan": lambda a: OpCount(),
    "cross_merge": _f_cross_merge,
    "ssim_map": _f_ssim_map,
    "ssim": _f_ssim,
    "sam_map": _f_sam_map,
    "select_points": lambda a: OpCount(),
    "gather_points": lambda a: OpCount(),
    "scatter_points": _f_scatter_points,
    "gather_sum_points": _f_gather_sum_points,
    "add_scatter_points": _f_add_scatter_points,
    "spectral_response": _f_spectral_response,
    "spatial_degrade": _f_spatial_degrade,
    "spatial_degrade_adjoint": _f_spatial_degrade_adjoint,
    "spectral_response_ssim": _f_spectral_response_ssim,
    "spatial_degrade_sam": _f_spatial_degrade_sam,
    "subspace_guidance": _f_subspace_guidance,
    "channel_attention": _f_channel_attention,
}
BACKWARD_FACTOR = 2
# Backward ops that are pure data movement whatever their forward does (a gather's backward is
# a scatter of the gradient, a scatter's is a gather of it): 0, not 2x the forward.
BACKWARD_FORMULAS: dict[str, Callable[[_Args], OpCount]] = {
    "gather_points_backward": lambda a: OpCount(),
    "scatter_points_backward": lambda a: OpCount(),
}


def formula_for(op_name: str) -> tuple[Optional[Callable[[_Args], OpCount]], int]:
    """(forward formula, multiplier) for a fastfuse custom op name, e.g. 'sam_map_backward' -> (sam, 2)."""
    if op_name in FORMULAS:
        return FORMULAS[op_name], 1
    if op_name in BACKWARD_FORMULAS:
        return BACKWARD_FORMULAS[op_name], 1
    if op_name.endswith("_backward") and op_name[: -len("_backward")] in FORMULAS:
        return FORMULAS[op_name[: -len("_backward")]], BACKWARD_FACTOR
    return None, 0


# --------------------------------------------------------------------------- registration

# Ops whose formula could not be evaluated in a counting run (missing formula or argument):
# name -> reason. count_flops reports them rather than silently counting 0.
_UNCOUNTED: dict[str, str] = {}


def fastfuse_op_names() -> list[str]:
    """Every torch.ops.fastfuse.* op registered in this process (custom ops of loaded families)."""
    names = {n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("fastfuse::")}
    return sorted(names)


def _schema_names(packet) -> list[str]:
    return [arg.name for arg in packet.default._schema.arguments]


def _op_counter(op_name: str, packet) -> Callable[..., OpCount]:
    """Raw-argument function computing the OpCount of one call of `op_name`."""
    formula, factor = formula_for(op_name)
    names = _schema_names(packet)

    def count(*args, out_val=None, **kwargs) -> OpCount:
        if formula is None:
            _UNCOUNTED[op_name] = "no FLOP formula for this op"
            return OpCount()
        try:
            return formula(_Args(names, args, kwargs, out_val)).scaled(factor)
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            _UNCOUNTED[op_name] = f"formula could not read its arguments ({exc})"
            return OpCount()

    return count


def _raw(fn: Callable) -> Callable:
    fn._get_raw = True  # FlopCounterMode must not shape-wrap it again
    return fn


def _convention_formula(counter: Callable[..., OpCount], convention: str) -> Callable:
    return _raw(lambda *args, out_val=None, **kwargs: counter(*args, out_val=out_val, **kwargs).total(convention))


def register_flop_formulas() -> list[str]:
    """Register (torch-convention) formulas for every fastfuse op not yet registered; returns them."""
    added = []
    for name in fastfuse_op_names():
        packet = getattr(torch.ops.fastfuse, name)
        if packet in flop_counter.flop_registry:
            continue
        counter = _op_counter(name, packet)
        flop_counter.register_flop_formula(packet, get_raw=True)(_convention_formula(counter, "torch"))
        added.append(name)
    return added


def _load_families() -> None:
    from fastfuse.info import import_families
    import_families()


# --------------------------------------------------------------------------- model counting

@dataclass
class FlopReport:
    convention: str
    total: int
    params: int
    by_op: dict[str, int]
    by_module: dict[str, int]
    uncounted: dict[str, str] = field(default_factory=dict)

    def format(self, top: int = 20) -> str:
        lines = [f"convention: {self.convention} — {CONVENTION_HELP[self.convention]}",
                 f"params: {human(self.params)} ({self.params:,})",
                 f"FLOPs:  {human(self.total)} ({self.total:,})" + ("  [MACs]" if self.convention != "torch" else "")]
        if self.by_op:
            lines += ["", "by op:"]
            width = max(len(k) for k in self.by_op)
            for name, value in sorted(self.by_op.items(), key=lambda kv: -kv[1])[:top]:
                share = 100.0 * value / self.total if self.total else 0.0
                lines.append(f"  {name.ljust(width)}  {human(value):>10}  {share:5.1f}%")
        if self.by_module:
            lines += ["", "by module:"]
            width = max(len(k) for k in self.by_module)
            for name, value in sorted(self.by_module.items())[:top]:
                share = 100.0 * value / self.total if self.total else 0.0
                lines.append(f"  {name.ljust(width)}  {human(value):>10}  {share:5.1f}%")
        for name, reason in self.uncounted.items():
            lines.append(f"warning: fastfuse::{name} counted as 0: {reason}")
        return "\n".join(lines)


def human(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:g}"


_ATTENTION_OPS = ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn_attention",
                  "flex_attention", "_varlen_attn")


def _storage_key(t: torch.Tensor) -> int:
    """The identity of t's storage: its StorageImpl, not its data pointer, so that counting on
    the meta device (every data pointer 0, nothing computed) still tells weights from activations."""
    return t.untyped_storage()._cdata


def _aten_mapping(convention: str, param_storages: set) -> dict:
    """Wrap torch's own formulas for the MAC-based conventions (every one is multiply-add based)."""
    if convention == "torch":
        return {}

    def touches_parameter(args) -> bool:
        for t in args:
            if isinstance(t, torch.Tensor):
                try:
                    if _storage_key(t) in param_storages:
                        return True
                except (RuntimeError, NotImplementedError):
                    continue
        return False

    mapping = {}
    for target, fn in list(flop_counter.flop_registry.items()):
        if str(getattr(target, "_qualified_op_name", "")).startswith("fastfuse::"):
            continue  # ours are mapped per convention by count_flops
        name = str(getattr(target, "__name__", target))
        attention = any(key in name for key in _ATTENTION_OPS)

        def wrapped(*args, out_val=None, _fn=fn, _attention=attention, **kwargs):
            if convention == "paper" and (_attention or not touches_parameter(args)):
                return 0
            return _fn(*args, out_val=out_val, **kwargs) // 2
        mapping[target] = _raw(wrapped)
    return mapping


def count_flops(model: Callable, inputs: Sequence[torch.Tensor], convention: str = "torch", *,
                module_depth: int = 1) -> FlopReport:
    """FLOPs (in `convention`) and parameters of one forward call `model(*inputs)`, without grad."""
    if convention not in CONVENTIONS:
        raise ValueError(f"fastfuse.flops.count_flops: convention must be one of {CONVENTIONS}, got {convention!r}")
    register_flop_formulas()
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    param_storages = set()
    for p in params:
        try:
            param_storages.add(_storage_key(p))
        except (RuntimeError, NotImplementedError):
            pass
    mapping = _aten_mapping(convention, param_storages)
    for name in fastfuse_op_names():
        packet = getattr(torch.ops.fastfuse, name)
        mapping[packet] = _convention_formula(_op_counter(name, packet), convention)
    _UNCOUNTED.clear()
    with torch.no_grad():
        mode = FlopCounterMode(display=False, custom_mapping=mapping)
        with mode:
            model(*inputs)
    counts = mode.get_flop_counts()
    by_op = {str(op): int(v) for op, v in counts.get("Global", {}).items() if v}
    by_module = {}
    for name, per_op in counts.items():
        if name != "Global" and name.count(".") < module_depth + 1 and sum(per_op.values()):
            by_module[name] = int(sum(per_op.values()))
    return FlopReport(convention, int(sum(counts.get("Global", {}).values())), sum(p.numel() for p in params),
                      by_op, by_module, dict(_UNCOUNTED))


# --------------------------------------------------------------------------- CLI helpers

def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """'1x31x64x64,1x3x256x256' -> [(1, 31, 64, 64), (1, 3, 256, 256)]."""
    shapes = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            dims = tuple(int(d) for d in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"--input: cannot read shape {part!r}; expected sizes joined by 'x', "
                             "e.g. 1x31x64x64 (several shapes separated by commas)") from None
        if not dims or any(d < 0 for d in dims):
            raise ValueError(f"--input: shape {part!r} must have non-negative sizes")
        shapes.append(dims)
    if not shapes:
        raise ValueError("--input: give at least one shape, e.g. 1x31x64x64")
    return shapes


def load_model(spec: str, kwargs: Optional[dict] = None) -> Callable:
    """'package.module:factory_or_class' -> the model (a class is instantiated, a factory called)."""
    import os
    import sys
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model {spec!r}: expected 'package.module:factory_or_class'")
    if os.getcwd() not in sys.path:  # so that a model file in the working directory can be named
        sys.path.insert(0, os.getcwd())
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module):
        if kwargs:
            raise ValueError(f"model {spec!r} is a module instance; --kwargs cannot be applied")
        return obj
    if not callable(obj):
        raise TypeError(f"model {spec!r} is a {type(obj).__name__}, not a class, factory or module")
    model = obj(**(kwargs or {}))
    if not callable(model):
        raise TypeError(f"model {spec!r}: calling it returned a {type(model).__name__}, not a module or callable")
    return model


def random_inputs(shapes: Sequence[tuple[int, ...]], device: str = "cpu",
                  dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


_load_families()
register_flop_formulas()
