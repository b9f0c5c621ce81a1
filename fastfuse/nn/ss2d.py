"""`SS2D`: VMamba's 2-D selective-scan block on fastfuse.cross_selective_scan.

Parameter names, shapes and initialisation follow VMamba's SS2D (MzeroMiko/VMamba,
classification/models/vmamba.py), so that the state_dict of a VMamba SS2D of the same
configuration loads with strict=True:

  in_proj.weight      (d_proj, d_model)         d_proj = 2·d_inner with the z gate, else d_inner
  in_proj.bias        (d_proj,)                 only with bias=True
  conv2d.weight/bias  (d_inner, 1, k, k)        depthwise, only when d_conv > 1
  x_proj_weight       (4, R + 2N, d_inner)
  dt_projs_weight     (4, d_inner, R)           dt_projs_bias (4, d_inner)
  A_logs              (4·d_inner, N)            Ds (4·d_inner,)
  out_norm.*          LayerNorm: weight/bias (d_inner,); see the out-norm postfixes below
  out_proj.weight     (d_model, d_inner)        out_proj.bias only with bias=True

Forward types, parsed the way VMamba's SS2D parses them (see `parse_forward_type`):
  "v0", "v0seq"                         VMamba's SS2Dv0 (the released VMamba v0 checkpoints,
                                         configs/vssm/vmambav0_*.yaml; v0seq: ablation a0seq)
  core + postfixes, core one of
    v01 v02 v03 v04 v05 v2 v3           the four cross directions (configs/vssmab a01..a3, a7..a9d)
    v051d                               unidirectional scan, csm scans=1 (vssmab unidi*)
    v052d                               bidirectional scan, csm scans=2 (vssmab bidi*)
    v052dc                              cascaded row-then-column scan (vssmab cas2d*)
  postfixes, in this order after the core (VMamba strips them from the end):
    _onnone | _ondwconv3 | _oncnorm | _onsoftmax | _onsigmoid   the out norm (default LayerNorm)
    _nozact   z gate without its activation       _noz   no z gate (in_proj to d_inner)
    _oact     GELU after the out norm             _no32  VMamba's "no fp32 cast" (precision only)
The released VMamba v2 checkpoints (configs/vssm/vmambav2*_*.yaml) use "v05_noz"; VMamba's
constructor default is "v2" (z gate); fastfuse's default stays "v05_noz", and loading a state_dict
of the other kind fails with a message naming the forward_type to pass.
VMamba's SS2Dv3 ("xv…") and SS2Dm0 ("m0…", a Mamba-2 scan) types and the debug "v052d3" are
refused; no configuration with released weights uses them.

Readings of VMamba that are not obvious, and where fastfuse differs:
* v01…v05, v2, v3 differ in VMamba only in which kernels run and at what precision (einsum vs
  grouped conv1d, fp32 casts); they compute one function, here always with fp32 accumulation and
  (VMamba's "oflex") an fp32 scan output for half inputs, normalised in fp32. _no32 changes nothing.
* VMamba's v0/v0seq ignore act_layer, d_conv, conv_bias, bias, the dt_* arguments, initialize and
  channel_first (asserting False), hard-coding SiLU, d_conv=3, conv_bias=True, bias=False and the
  Mamba init. Here they are honoured; at their defaults the parameters match VMamba's. v0seq
  (four separate scans) is the same function as v0.
* v052dc: LayerNorm without affine over channels (eps 1e-5), directions 0 and 1 scan each row
  forwards and backwards, their outputs are summed, LayerNorm again, then directions 2 and 3 scan
  each column. VMamba sums the reversed scan's output without flipping it back to pixel order;
  that is reproduced, since the checkpoints were trained with it.
* _onsoftmax is a softmax over the H·W positions of each channel (VMamba's SoftmaxSpatial).
* d_conv < 2 (VMamba's configs write -1) means no convolution. An even d_conv pads 'same'
  (one more pixel bottom/right): VMamba's padding (k − 1)//2 would shrink the image by a pixel.
* initialize: "v0" Mamba's init (dt log-uniform in [dt_min, dt_max], A = -(1..N), D = 1);
  "v1" A_logs ~ N(0, 1), dt weight and bias ~ 0.1·N(0, 1); "v2" A_logs = 0, dt weight and bias
  ~ 0.1·U(0, 1); D = 1 in all. VMamba marks A_logs/Ds `_no_weight_decay` only under "v0"; here
  they are marked under every initialization (no_weight_decay() names them).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from fastfuse.ops.cross_scan import cross_merge, cross_scan, cross_selective_scan
from fastfuse.ops.selective_scan import selective_scan

K_DIRECTIONS = 4
CASCADE = -1  # scan mode of v052dc
CORE_SCANS = {"v01": 0, "v02": 0, "v03": 0, "v04": 0, "v05": 0, "v2": 0, "v3": 0,
              "v051d": 1, "v052d": 2, "v052dc": CASCADE}
OUT_NORM_POSTFIXES = ("_onnone", "_ondwconv3", "_oncnorm", "_onsoftmax", "_onsigmoid")  # VMamba's order
INITIALIZATIONS = ("v0", "v1", "v2")
SUPPORTED_FORWARD_TYPES = (
    "'v0', 'v0seq', or a core in (" + ", ".join(CORE_SCANS) + ") followed by optional postfixes in this order: "
    "one of " + ", ".join(OUT_NORM_POSTFIXES) + "; _nozact; _noz; _oact; _no32 (e.g. 'v05_noz', 'v2', "
    "'v05_onsoftmax_noz')")


@dataclass(frozen=True)
class ForwardVariant:
    """What a VMamba forward type computes (the parts that change parameters or results)."""
    z_gate: bool
    z_act: bool
    out_act: bool
    out_norm: str   # "layernorm", "none", "dwconv3", "cnorm", "softmax", "sigmoid"
    scans: int      # 0 cross, 1 unidirectional, 2 bidirectional, CASCADE


def _strip(postfix: str, value: str) -> tuple[bool, str]:
    return (True, value[:-len(postfix)]) if value.endswith(postfix) else (False, value)


def parse_forward_type(forward_type: str) -> ForwardVariant:
    """VMamba's forward_type string -> ForwardVariant, or a ValueError listing what is supported."""
    def refuse(why: str):
        raise ValueError(f"fastfuse.nn.SS2D: forward_type {forward_type!r} is not supported{why}; supported: "
                         f"{SUPPORTED_FORWARD_TYPES}")

    if not isinstance(forward_type, str):
        refuse("")
    if forward_type in ("v0", "v0seq"):
        return ForwardVariant(z_gate=True, z_act=True, out_act=False, out_norm="layernorm", scans=0)
    if forward_type.startswith("xv") or forward_type.startswith("m"):
        refuse(" (VMamba's SS2Dv3 'xv…' and SS2Dm0 'm…' blocks are not implemented)")
    # The same sequence of end-strips as VMamba's SS2Dv2 constructor and get_outnorm.
    rest = forward_type
    _, rest = _strip("_no32", rest)
    out_act, rest = _strip("_oact", rest)
    no_z, rest = _strip("_noz", rest)
    no_z_act, rest = _strip("_nozact", rest)
    found = {}
    for postfix in OUT_NORM_POSTFIXES:
        found[postfix], rest = _strip(postfix, rest)
    out_norm = next((p[3:] for p in OUT_NORM_POSTFIXES if found[p]), "layernorm")
    if rest not in CORE_SCANS:
        refuse(f" (core {rest!r} after removing the postfixes)" if rest != forward_type else "")
    return ForwardVariant(z_gate=not no_z, z_act=not no_z_act, out_act=out_act, out_norm=out_norm,
                          scans=CORE_SCANS[rest])


class _PointwiseLinear(nn.Linear):
    """nn.Linear applied over dim 1 of a (B, C, H, W) tensor when channel_first.

    Its weight keeps nn.Linear's (out, in) shape, so both layouts share one state_dict; a
    1×1-conv shaped (out, in, 1, 1) weight is also accepted on load, as VMamba's Linear2d does.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, channel_first: bool, **factory):
        super().__init__(in_features, out_features, bias=bias, **factory)
        self.channel_first = channel_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_first:
            return F.conv2d(x, self.weight[:, :, None, None], self.bias)
        return super().forward(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dim() == 4 and state_dict[key].shape[2:] == (1, 1):
            state_dict[key] = state_dict[key].flatten(1)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_config(d_model, d_state, ssm_ratio, dt_rank, act_layer, d_conv, dt_min, dt_max, dt_init_floor,
                  initialize) -> None:
    def positive_int(name, value, limit=None):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"fastfuse.nn.SS2D: {name} must be a positive int, got {value!r}")
        if limit is not None and value > limit:
            raise ValueError(f"fastfuse.nn.SS2D: {name} must be at most {limit} (the scan keeps N ≤ {limit} states), "
                             f"got {value}")

    positive_int("d_model", d_model)
    positive_int("d_state", d_state, limit=256)
    if dt_rank != "auto":
        if isinstance(dt_rank, str):
            raise ValueError(f"fastfuse.nn.SS2D: dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        positive_int("dt_rank", dt_rank)
    if isinstance(d_conv, bool) or not isinstance(d_conv, int):
        raise ValueError(f"fastfuse.nn.SS2D: d_conv must be an int (< 2 for no conv, as VMamba's -1), "
                         f"got {d_conv!r}")
    if not (_is_number(ssm_ratio) and ssm_ratio > 0):
        raise ValueError(f"fastfuse.nn.SS2D: ssm_ratio must be a positive number, got {ssm_ratio!r}")
    if not callable(act_layer):
        raise TypeError(f"fastfuse.nn.SS2D: act_layer must be an nn.Module class (e.g. nn.SiLU), got {act_layer!r}")
    for name, value in (("dt_min", dt_min), ("dt_max", dt_max), ("dt_init_floor", dt_init_floor)):
        if not (_is_number(value) and 0 < value < math.inf):
            raise ValueError(f"fastfuse.nn.SS2D: {name} must be a finite positive number, got {value!r}")
    if dt_min > dt_max:
        raise ValueError(f"fastfuse.nn.SS2D: dt_min must not exceed dt_max, got {dt_min} > {dt_max}")
    if initialize not in INITIALIZATIONS:
        raise ValueError(f"fastfuse.nn.SS2D: initialize must be one of {INITIALIZATIONS} (VMamba's), "
                         f"got {initialize!r}")


def _depthwise3x3(channels: int, **factory) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels, bias=False, **factory)


def _make_out_norm(kind: str, channels: int, **factory) -> nn.Module:
    # The nn.Identity slots stand where VMamba's Sequentials hold (parameterless) Permutes, so that
    # the parameter names (out_norm.1.weight, out_norm.0/2.*) match its state_dict.
    if kind == "layernorm":
        return nn.LayerNorm(channels, **factory)
    if kind == "dwconv3":
        return nn.Sequential(nn.Identity(), _depthwise3x3(channels, **factory), nn.Identity())
    if kind == "cnorm":
        return nn.Sequential(nn.LayerNorm(channels, **factory), nn.Identity(), _depthwise3x3(channels, **factory),
                             nn.Identity())
    return nn.Identity()  # none, softmax, sigmoid: no parameters


def _out_norm_kind(state_dict, prefix: str) -> str:
    """Which out norm a state_dict holds, from its out_norm.* keys (the layouts _make_out_norm builds)."""
    if prefix + "0.weight" in state_dict and prefix + "2.weight" in state_dict:
        return "cnorm"
    if prefix + "1.weight" in state_dict:
        return "dwconv3"
    if prefix + "weight" in state_dict:
        return "layernorm"
    return "parameterless"


def _cast(p, dtype):
    return None if p is None else p.to(dtype)


class SS2D(nn.Module):
    """VMamba's SS2D: in_proj, depthwise conv, act, 2-D selective scan, out norm, z gate, out_proj.

    Input and output are (B, H, W, d_model), or (B, d_model, H, W) with channel_first=True.
    `forward_type` and `initialize` take VMamba's values (see the module docstring for the list and
    for how each reading of VMamba was made). `backend` is passed to the fastfuse scan ops
    ("torch" keeps a pure-PyTorch path). With half-precision inputs the scan returns fp32 and the
    out norm runs in fp32 before the result is cast back (VMamba's fp32-out selective scan).
    """

    def __init__(self, d_model: int = 96, d_state: int = 16, ssm_ratio: float = 2.0,
                 dt_rank: Union[int, str] = "auto", act_layer: type = nn.SiLU, d_conv: int = 3,
                 conv_bias: bool = True, dropout: float = 0.0, bias: bool = False, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 initialize: str = "v0", forward_type: str = "v05_noz", channel_first: bool = False,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        variant = parse_forward_type(forward_type)
        if dt_init not in ("random", "constant"):
            raise ValueError(f"fastfuse.nn.SS2D: dt_init must be 'random' or 'constant', got {dt_init!r}")
        _check_config(d_model, d_state, ssm_ratio, dt_rank, act_layer, d_conv, dt_min, dt_max, dt_init_floor,
                      initialize)
        factory = {"device": device, "dtype": dtype}
        self.d_model = int(d_model)
        self.d_state = int(d_state)
        self.d_inner = int(ssm_ratio * d_model)
        self.dt_rank = math.ceil(self.d_model / 16) if dt_rank == "auto" else int(dt_rank)
        if min(self.d_model, self.d_state, self.d_inner, self.dt_rank) < 1:
            raise ValueError(f"fastfuse.nn.SS2D: d_model, d_state, d_inner = ssm_ratio·d_model and dt_rank must be "
                             f">= 1, got {self.d_model}, {self.d_state}, {self.d_inner}, {self.dt_rank}")
        self.forward_type = forward_type
        self.initialize = initialize
        self.variant = variant
        self.with_z = variant.z_gate
        self.channel_first = bool(channel_first)
        self.backend = backend
        D, N, R = self.d_inner, self.d_state, self.dt_rank

        self.in_proj = _PointwiseLinear(self.d_model, 2 * D if self.with_z else D, bias, self.channel_first,
                                        **factory)
        self.act = act_layer()
        self.with_dconv = d_conv > 1
        if self.with_dconv:
            # 'same' output size; an even kernel gets the extra pixel of padding bottom/right, padded
            # explicitly (conv2d's padding='same' would warn and copy on every call).
            self._even_conv_pad = None if d_conv % 2 else ((d_conv - 1) // 2, d_conv // 2) * 2
            self.conv2d = nn.Conv2d(D, D, kernel_size=d_conv, padding=(d_conv - 1) // 2 if d_conv % 2 else 0,
                                    groups=D, bias=conv_bias, **factory)

        # Four directions' projections stacked; each initialised like nn.Linear(D, R + 2N).
        bound = 1.0 / math.sqrt(D)
        self.x_proj_weight = nn.Parameter(torch.empty(K_DIRECTIONS, R + 2 * N, D, **factory).uniform_(-bound, bound))
        self.dt_projs_weight = nn.Parameter(torch.empty(K_DIRECTIONS, D, R, **factory))
        self.dt_projs_bias = nn.Parameter(torch.empty(K_DIRECTIONS, D, **factory))
        # A_logs and Ds stay fp32 whatever `dtype` (VMamba: "Keep in fp32").
        self.A_logs = nn.Parameter(torch.empty(K_DIRECTIONS * D, N, device=device))
        self.Ds = nn.Parameter(torch.ones(K_DIRECTIONS * D, device=device))
        self._init_dt_A(initialize, dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
        self._mark_no_weight_decay()

        self.out_norm = _make_out_norm(variant.out_norm, D, **factory)
        self.out_act = nn.GELU() if variant.out_act else nn.Identity()
        self.out_proj = _PointwiseLinear(D, self.d_model, bias, self.channel_first, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()

    def _mark_no_weight_decay(self) -> None:
        # VMamba's optimizer builders look for this attribute on the parameter itself.
        for name in self.no_weight_decay():
            getattr(self, name)._no_weight_decay = True

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters to exclude from weight decay (the timm/VMamba convention)."""
        return {"A_logs", "Ds"}

    def __deepcopy__(self, memo):
        # Parameter.__deepcopy__ keeps only data and requires_grad: mark the copies again.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        new._mark_no_weight_decay()
        return new

    @torch.no_grad()
    def _init_dt_A(self, initialize: str, dt_init: str, dt_scale: float, dt_min: float, dt_max: float,
                   dt_init_floor: float) -> None:
        if initialize == "v1":
            self.A_logs.normal_()
            self.dt_projs_weight.normal_().mul_(0.1)
            self.dt_projs_bias.normal_().mul_(0.1)
            return
        if initialize == "v2":
            self.A_logs.zero_()
            self.dt_projs_weight.uniform_().mul_(0.1)
            self.dt_projs_bias.uniform_().mul_(0.1)
            return
        # "v0", Mamba's: S4D-real A = -(1..N) per channel, kept as log; dt weights keep the variance
        # of delta at init; the bias is the inverse softplus of dt drawn log-uniformly in
        # [dt_min, dt_max], so softplus(bias) starts there.
        self.A_logs.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_logs))
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            self.dt_projs_weight.fill_(std)
        else:
            self.dt_projs_weight.uniform_(-std, std)
        log_dt = torch.rand(self.dt_projs_bias.shape, device=self.dt_projs_bias.device)
        dt = torch.exp(log_dt * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    # ------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1 if self.channel_first else 3] != self.d_model:
            want = "(B, d_model, H, W)" if self.channel_first else "(B, H, W, d_model)"
            raise ValueError(f"fastfuse.nn.SS2D: input must be {want} with d_model={self.d_model}, "
                             f"got shape {tuple(x.shape)}")
        height, width = (x.shape[2], x.shape[3]) if self.channel_first else (x.shape[1], x.shape[2])
        if height == 0 or width == 0:
            raise ValueError(f"fastfuse.nn.SS2D: the image must be at least 1×1, got {height}×{width} "
                             f"(input shape {tuple(x.shape)})")
        if x.dtype != self.in_proj.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"fastfuse.nn.SS2D: the input is {x.dtype} but the module's parameters are "
                            f"{self.in_proj.weight.dtype}; convert one (module.to({x.dtype}) or x.to("
                            f"{self.in_proj.weight.dtype})) or run under torch.autocast")
        channel_dim = 1 if self.channel_first else 3
        x = self.in_proj(x)
        z = None
        if self.with_z:
            x, z = x.chunk(2, dim=channel_dim)
            z = self.act(z) if self.variant.z_act else z
        if self.with_dconv:
            x = x if self.channel_first else x.permute(0, 3, 1, 2)
            x = self.conv2d(x if self._even_conv_pad is None else F.pad(x, self._even_conv_pad))
            x = x if self.channel_first else x.permute(0, 2, 3, 1)  # a view: the scan reads any strides
        x = self.act(x)

        y = self._out_norm(self._scan(x)).to(x.dtype)
        y = self.out_act(y)
        if z is not None:
            y = y * z
        return self.dropout(self.out_proj(y))

    def _scan(self, x: torch.Tensor) -> torch.Tensor:
        """The 2-D selective scan, in x's layout; fp32 for half x (VMamba's oflex)."""
        if self.variant.scans == 0:
            return cross_selective_scan(x, self.x_proj_weight, None, self.dt_projs_weight, self.dt_projs_bias,
                                        self.A_logs, self.Ds, delta_softplus=True, out_dtype="oflex",
                                        channel_last=not self.channel_first, backend=self.backend)
        image = x if self.channel_first else x.permute(0, 3, 1, 2)
        image = image.to(torch.float32) if image.dtype in (torch.float16, torch.bfloat16) else image
        if self.variant.scans == CASCADE:
            y = self._cascade_scan(image)
        else:
            B, D, H, W = image.shape
            xs = cross_scan(image, scans=self.variant.scans, backend=self.backend)
            ys = self._directional_scan(xs, slice(0, K_DIRECTIONS))
            y = cross_merge(ys.view(B, K_DIRECTIONS, D, H, W), scans=self.variant.scans,
                            backend=self.backend).view(B, D, H, W)
        return y if self.channel_first else y.permute(0, 2, 3, 1)

    def _directional_scan(self, xs: torch.Tensor, directions: slice) -> torch.Tensor:
        """Selective scans of sequences xs (batch, K, D, L) with the parameters of `directions`."""
        batch, K, D, L = xs.shape
        N, R, dtype = self.d_state, self.dt_rank, xs.dtype
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight[directions].to(dtype))
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        deltas = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight[directions].to(dtype))
        channels = slice(directions.start * D, directions.stop * D)
        ys = selective_scan(xs.reshape(batch, K * D, L), deltas.reshape(batch, K * D, L),
                            -torch.exp(self.A_logs[channels].to(dtype)), Bs.contiguous(), Cs.contiguous(),
                            self.Ds[channels].to(dtype), delta_bias=self.dt_projs_bias[directions].reshape(-1),
                            delta_softplus=True, backend=self.backend)  # grouped B/C: channel k·D + d reads k
        return ys.view(batch, K, D, L)

    def _cascade_scan(self, image: torch.Tensor) -> torch.Tensor:
        """v052dc: rows (directions 0, 1: forwards, backwards), then columns (2, 3); see the module doc."""
        B, D, H, W = image.shape

        def normalise(t):  # LayerNorm over channels without affine, on (B, D, H, W)
            return F.layer_norm(t.permute(0, 2, 3, 1), (D,)).permute(0, 3, 1, 2)

        def both_ways(lines, directions):  # lines (batch, D, L) -> the two scans' outputs summed
            ys = self._directional_scan(torch.stack([lines, lines.flip(-1)], dim=1), directions)
            return ys.sum(dim=1)  # VMamba does not flip the reversed scan's output back

        rows = normalise(image).permute(0, 2, 1, 3).reshape(B * H, D, W)
        y_row = both_ways(rows, slice(0, 2)).view(B, H, D, W).permute(0, 2, 1, 3)
        cols = normalise(y_row).permute(0, 3, 1, 2).reshape(B * W, D, H)
        return both_ways(cols, slice(2, 4)).view(B, W, D, H).permute(0, 2, 3, 1)

    def _out_norm(self, y: torch.Tensor) -> torch.Tensor:
        """VMamba's out norm of the chosen kind, in y's dtype (fp32 for half inputs)."""
        kind = self.variant.out_norm
        if kind == "none":
            return y
        if kind == "sigmoid":
            return torch.sigmoid(y)
        if kind == "softmax":  # over the H·W positions of each channel
            return torch.softmax(y.flatten(2), dim=-1).view_as(y) if self.channel_first else \
                torch.softmax(y.flatten(1, 2), dim=1).view_as(y)
        if kind == "layernorm":
            return self._layer_norm(self.out_norm, y)
        if kind == "cnorm":
            y = self._layer_norm(self.out_norm[0], y)
        conv = self.out_norm[1] if kind == "dwconv3" else self.out_norm[2]
        image = y if self.channel_first else y.permute(0, 3, 1, 2)
        image = F.conv2d(image, conv.weight.to(y.dtype), None, padding=1, groups=self.d_inner)
        return image if self.channel_first else image.permute(0, 2, 3, 1)

    def _layer_norm(self, norm: nn.LayerNorm, y: torch.Tensor) -> torch.Tensor:
        if self.channel_first:
            y = y.permute(0, 2, 3, 1)
        y = F.layer_norm(y, norm.normalized_shape, _cast(norm.weight, y.dtype), _cast(norm.bias, y.dtype), norm.eps)
        return y.permute(0, 3, 1, 2) if self.channel_first else y

    # ------------------------------------------------------------------------- state_dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        hint = self._forward_type_hint(state_dict, prefix, strict)
        if hint:
            error_msgs.append(hint)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _forward_type_hint(self, state_dict, prefix: str, strict: bool):
        """A message naming the forward_type when a state_dict comes from an SS2D of another kind."""
        here = f"this SS2D was built with forward_type={self.forward_type!r}"
        weight = state_dict.get(prefix + "in_proj.weight")
        if weight is not None and weight.dim() >= 2 and weight.shape[1] == self.d_model:
            rows, ours = weight.shape[0], self.in_proj.weight.shape[0]
            if rows == 2 * ours and not self.with_z:
                return (f"{prefix}in_proj.weight has 2·d_inner = {rows} rows: the state_dict comes from an SS2D "
                        f"with the z gate (VMamba's default forward_type 'v2', or 'v0', 'v05'), but {here} "
                        f"(no z gate; fastfuse's default is 'v05_noz'). Construct fastfuse.nn.SS2D(..., "
                        f"forward_type='v2') (or the state_dict's own forward type) to load it.")
            if 2 * rows == ours and self.with_z:
                return (f"{prefix}in_proj.weight has d_inner = {rows} rows: the state_dict comes from an SS2D "
                        f"without the z gate (a '_noz' forward type, e.g. VMamba v2's released 'v05_noz'), but "
                        f"{here}. Construct fastfuse.nn.SS2D(..., forward_type='v05_noz') to load it.")
        if not strict or weight is None:
            return None
        theirs, ours = _out_norm_kind(state_dict, prefix + "out_norm."), self.variant.out_norm
        ours = "parameterless" if ours in ("none", "softmax", "sigmoid") else ours
        if theirs != ours:
            postfix = {"layernorm": "no out-norm postfix", "dwconv3": "'_ondwconv3'", "cnorm": "'_oncnorm'",
                       "parameterless": "'_onnone', '_onsoftmax' or '_onsigmoid' (no out_norm parameters)"}
            return (f"the state_dict's out_norm parameters fit a forward type with {postfix[theirs]}, but {here}; "
                    f"pass the forward_type the state_dict was saved with")
        return None

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, "
                f"forward_type={self.forward_type!r}, initialize={self.initialize!r}, "
                f"channel_first={self.channel_first}, backend={self.backend!r}")
