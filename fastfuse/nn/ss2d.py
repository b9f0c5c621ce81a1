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
  out_norm.weight/bias (d_inner,)               LayerNorm over channels
  out_proj.weight     (d_model, d_inner)        out_proj.bias only with bias=True

Forward types. VMamba's forward types differ in which kernels run and in what precision, not
in the function computed, except for the z gate:
  "v0", "v2", "v05"      in_proj to 2·d_inner, split (x, z), output gated by act(z)
  "v2_noz", "v05_noz"    no z gate (in_proj to d_inner)
The z gate's activation is act_layer, as in VMamba. VMamba's v0 asserts channel_first=False; here
every forward type works in both layouts.
"""
from __future__ import annotations

import copy
import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from fastfuse.ops.cross_scan import cross_selective_scan

K_DIRECTIONS = 4
FORWARD_TYPES = {"v0": True, "v2": True, "v05": True, "v2_noz": False, "v05_noz": False}  # -> has z gate


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


def _check_config(d_model, d_state, ssm_ratio, dt_rank, act_layer, d_conv, dt_min, dt_max, dt_init_floor) -> None:
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
    if isinstance(d_conv, bool) or not isinstance(d_conv, int) or d_conv < 0:
        raise ValueError(f"fastfuse.nn.SS2D: d_conv must be a non-negative int (≤ 1 for no conv), got {d_conv!r}")
    if d_conv > 1 and d_conv % 2 == 0:
        raise ValueError(f"fastfuse.nn.SS2D: d_conv must be odd (an even depthwise kernel with 'same' padding "
                         f"(k − 1)//2 shrinks the image by one pixel), got {d_conv}")
    if not (isinstance(ssm_ratio, (int, float)) and not isinstance(ssm_ratio, bool) and ssm_ratio > 0):
        raise ValueError(f"fastfuse.nn.SS2D: ssm_ratio must be a positive number, got {ssm_ratio!r}")
    if not callable(act_layer):
        raise TypeError(f"fastfuse.nn.SS2D: act_layer must be an nn.Module class (e.g. nn.SiLU), got {act_layer!r}")
    for name, value in (("dt_min", dt_min), ("dt_max", dt_max), ("dt_init_floor", dt_init_floor)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
            raise ValueError(f"fastfuse.nn.SS2D: {name} must be a finite positive number, got {value!r}")
    if dt_min > dt_max:
        raise ValueError(f"fastfuse.nn.SS2D: dt_min must not exceed dt_max, got {dt_min} > {dt_max}")


class SS2D(nn.Module):
    """VMamba's SS2D: in_proj, depthwise conv, act, cross selective scan, LayerNorm, z gate, out_proj.

    Input and output are (B, H, W, d_model), or (B, d_model, H, W) with channel_first=True.
    `backend` is passed to fastfuse.cross_selective_scan ("torch" keeps a pure-PyTorch path).
    With half-precision inputs the scan returns fp32 and the LayerNorm runs in fp32 before the
    result is cast back (VMamba's fp32-out selective scan).
    """

    def __init__(self, d_model: int = 96, d_state: int = 16, ssm_ratio: float = 2.0,
                 dt_rank: Union[int, str] = "auto", act_layer: type = nn.SiLU, d_conv: int = 3,
                 conv_bias: bool = True, dropout: float = 0.0, bias: bool = False, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 forward_type: str = "v05_noz", channel_first: bool = False, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if forward_type not in FORWARD_TYPES:
            raise ValueError(f"fastfuse.nn.SS2D: forward_type must be one of {tuple(FORWARD_TYPES)}, "
                             f"got {forward_type!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"fastfuse.nn.SS2D: dt_init must be 'random' or 'constant', got {dt_init!r}")
        _check_config(d_model, d_state, ssm_ratio, dt_rank, act_layer, d_conv, dt_min, dt_max, dt_init_floor)
        factory = {"device": device, "dtype": dtype}
        self.d_model = int(d_model)
        self.d_state = int(d_state)
        self.d_inner = int(ssm_ratio * d_model)
        self.dt_rank = math.ceil(self.d_model / 16) if dt_rank == "auto" else int(dt_rank)
        if min(self.d_model, self.d_state, self.d_inner, self.dt_rank) < 1:
            raise ValueError(f"fastfuse.nn.SS2D: d_model, d_state, d_inner = ssm_ratio·d_model and dt_rank must be "
                             f">= 1, got {self.d_model}, {self.d_state}, {self.d_inner}, {self.dt_rank}")
        self.forward_type = forward_type
        self.with_z = FORWARD_TYPES[forward_type]
        self.channel_first = bool(channel_first)
        self.backend = backend
        D, N, R = self.d_inner, self.d_state, self.dt_rank

        self.in_proj = _PointwiseLinear(self.d_model, 2 * D if self.with_z else D, bias, self.channel_first,
                                        **factory)
        self.act = act_layer()
        self.with_dconv = d_conv > 1
        if self.with_dconv:
            self.conv2d = nn.Conv2d(D, D, kernel_size=d_conv, padding=(d_conv - 1) // 2, groups=D, bias=conv_bias,
                                    **factory)

        # Four directions' projections stacked; each initialised like nn.Linear(D, R + 2N).
        bound = 1.0 / math.sqrt(D)
        self.x_proj_weight = nn.Parameter(torch.empty(K_DIRECTIONS, R + 2 * N, D, **factory).uniform_(-bound, bound))
        self.dt_projs_weight = nn.Parameter(torch.empty(K_DIRECTIONS, D, R, **factory))
        self.dt_projs_bias = nn.Parameter(torch.empty(K_DIRECTIONS, D, **factory))
        self._init_dt(dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
        # S4D-real: A = -(1..N) per channel, kept as log; D skip = 1. Both fp32, no weight decay.
        a_logs = torch.log(torch.arange(1, N + 1, dtype=torch.float32, device=device)).repeat(K_DIRECTIONS * D, 1)
        self.A_logs = nn.Parameter(a_logs)
        self.Ds = nn.Parameter(torch.ones(K_DIRECTIONS * D, device=device))
        self._mark_no_weight_decay()

        self.out_norm = nn.LayerNorm(D, **factory)
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
    def _init_dt(self, dt_init: str, dt_scale: float, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        # Mamba's dt init: weights keep the variance of delta at init; the bias is the inverse
        # softplus of dt drawn log-uniformly in [dt_min, dt_max], so softplus(bias) starts there.
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            self.dt_projs_weight.fill_(std)
        else:
            self.dt_projs_weight.uniform_(-std, std)
        log_dt = torch.rand(self.dt_projs_bias.shape, device=self.dt_projs_bias.device)
        dt = torch.exp(log_dt * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

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
            z = self.act(z)
        if self.with_dconv:
            x = self.conv2d(x if self.channel_first else x.permute(0, 3, 1, 2))
            x = x if self.channel_first else x.permute(0, 2, 3, 1)  # a view: the scan reads any strides
        x = self.act(x)

        half = x.dtype in (torch.float16, torch.bfloat16)
        y = cross_selective_scan(x, self.x_proj_weight, None, self.dt_projs_weight, self.dt_projs_bias, self.A_logs,
                                 self.Ds, delta_softplus=True, out_dtype=torch.float32 if half else None,
                                 channel_last=not self.channel_first, backend=self.backend)
        y = self._norm(y).to(x.dtype)
        if z is not None:
            y = y * z
        return self.dropout(self.out_proj(y))

    def _norm(self, y: torch.Tensor) -> torch.Tensor:
        weight = None if self.out_norm.weight is None else self.out_norm.weight.to(y.dtype)
        bias = None if self.out_norm.bias is None else self.out_norm.bias.to(y.dtype)
        if self.channel_first:
            y = y.permute(0, 2, 3, 1)
        y = F.layer_norm(y, self.out_norm.normalized_shape, weight, bias, self.out_norm.eps)
        return y.permute(0, 3, 1, 2) if self.channel_first else y

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, "
                f"forward_type={self.forward_type!r}, channel_first={self.channel_first}, backend={self.backend!r}")
