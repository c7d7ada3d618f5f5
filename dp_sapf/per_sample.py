"""Per-sample gradients, the joint clip, the clipped sum, its reduction across processes and the Gaussian noise.

Three per-sample engines, each tested against a batch-1 loop, behind one small protocol (`PerSampleEngine`:
a context manager around forward+backward, and `pop(batch_size)` -> {tensor: (B, *shape) gradients}):
- `LinearPerSampleHooks` (written here): a forward hook keeps each nn.Linear's input and a tensor hook on its
  output receives the output gradient; the per-sample weight gradient is one batched matmul in the autocast
  dtype. We write it by hand because opacus' GradSampleModule fails under bf16 autocast with torch >= 2.11
  (docs/design.md §4), and it materialises only the per-sample gradients of the hooked layers (LoRA-sized for LoRA).
- `LinearPerSampleProbes` (written here): the same gradients through autograd itself, for torch.compile.
- `OpacusGradSamples`: opacus' `GradSampleModule` (any layer type, fp32 only), for `--train_mode full`,
  where Conv2d and GroupNorm weights are trainable too.
`make_engine` picks and checks one. `accumulate_clipped` is the one loop over micro-batches (loss, backward,
clipped add) that training, selection and the audit share.

`ClippedGradientSum` is the privacy core shared by the selection and training: clip each sample's gradient
jointly over all tensors to norm C, sum, all-reduce the sums across processes, then add N(0, σ²C²) exactly
once, from a generator seeded identically on every rank so that all ranks add the same noise.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn


class PerSampleEngine(Protocol):
    """What every engine offers the step loops (`accumulate_clipped`)."""

    def __enter__(self): ...

    def __exit__(self, *exc): ...

    def pop(self, batch_size: int) -> dict[nn.Parameter, "torch.Tensor | LinearFactors"]:
        """The per-sample gradients of the last backward, `batch_size` rows per tensor, then forget them."""


class LinearFactors:
    """A per-sample weight gradient kept factored, G_b = g_bᵀ x_b, with g (B, T, out) and x (B, T, in).

    Book-keeping ("ghost") clipping: ‖G_b‖² = Σ_{t,s} (x_t·x_s)(g_t·g_s) costs B·T²·(in+out) instead of forming
    B·out·in numbers, and Σ_b c_b·G_b is one matmul. Worth it where T² < in·out (cross-attention k/v, the
    low-resolution levels). Norm and sum are both computed in full fp32 from the same stored factors, so the
    clip bound holds for the values that are summed; a non-finite sample is zeroed as in the materialised path.
    """

    def __init__(self, x: torch.Tensor, g: torch.Tensor):
        self.x, self.g = x, g

    @property
    def shape(self) -> tuple:
        return (self.x.shape[0], self.g.shape[-1], self.x.shape[-1])

    def append(self, other: "LinearFactors") -> "LinearFactors":
        """A module called twice in one forward: its gradient is the sum, i.e. the factors concatenated in T."""
        return LinearFactors(torch.cat([self.x, other.x], 1), torch.cat([self.g, other.g], 1))

    def materialise(self) -> torch.Tensor:
        return torch.bmm(self.g.float().transpose(1, 2), self.x.float())

    def squared_norms(self) -> torch.Tensor:
        with _full_fp32_matmuls():
            x, g = self.x.float(), self.g.float()
            return (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))

    def weighted_sum(self, factors: torch.Tensor) -> torch.Tensor:
        with _full_fp32_matmuls():
            x = torch.nan_to_num(self.x.float(), nan=0.0, posinf=0.0, neginf=0.0)
            g = torch.nan_to_num(self.g.float(), nan=0.0, posinf=0.0, neginf=0.0) * factors[:, None, None]
            return g.flatten(0, 1).T @ x.flatten(0, 1)


class _full_fp32_matmuls:
    """No TF32 inside: the clip bound must hold to fp32 precision, whatever --allow_tf32 says."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


GHOST_MODES = ("auto", "never", "always")


class LinearPerSampleHooks:
    """Collect per-sample gradients of the weights (and biases) of chosen nn.Linear modules.

    Works under any autocast dtype: the per-sample product runs in the dtype of the saved input and incoming
    output gradient (fp32 accumulation inside the matmul) and is kept in that dtype. Use as a context manager
    around forward+backward of a summed loss. ghost: keep a weight's per-sample gradients as `LinearFactors`
    never, always, or (auto) where that is smaller (T² ≤ in·out); `ClippedGradientSum` takes either form.
    """

    def __init__(self, modules: dict[str, nn.Linear], include_bias: bool = True, ghost: str = "never"):
        if ghost not in GHOST_MODES:
            raise ValueError(f"Unknown ghost mode {ghost!r}; choose from {', '.join(GHOST_MODES)}.")
        self.modules = modules
        self.include_bias = include_bias
        self.ghost = ghost
        self.grad_samples: dict[nn.Parameter, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        for module in self.modules.values():
            self._handles.append(module.register_forward_hook(self._forward_hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def pop(self, batch_size: int | None = None) -> dict[nn.Parameter, torch.Tensor]:
        """Hand over the per-sample gradients of the last backward and forget them (already `batch_size` rows)."""
        out, self.grad_samples = self.grad_samples, {}
        return out

    def _forward_hook(self, module: nn.Linear, inputs, output):
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        activation = inputs[0].detach()

        def on_output_grad(grad_output: torch.Tensor):
            # Under autocast both factors are bf16/fp16 already: multiply in that dtype (fp32 accumulation inside
            # the matmul) and keep the product in it: the clip reads it once for the norm (accumulated in fp32)
            # and once for the sum, so the clip bound holds for exactly the values that are summed.
            dtype = activation.dtype if activation.dtype == grad_output.dtype else torch.float32
            x = activation.to(dtype).reshape(activation.shape[0], -1, activation.shape[-1])
            g = grad_output.to(dtype).reshape(grad_output.shape[0], -1, grad_output.shape[-1])
            tokens = x.shape[1]
            if self.ghost == "always" or (self.ghost == "auto" and tokens * tokens <= x.shape[-1] * g.shape[-1]):
                self._accumulate(module.weight, LinearFactors(x, g))
            else:
                self._accumulate(module.weight, torch.bmm(g.transpose(1, 2), x))
            if self.include_bias and module.bias is not None and module.bias.requires_grad:
                self._accumulate(module.bias, g.float().sum(1))

        output.register_hook(on_output_grad)

    def _accumulate(self, param: nn.Parameter, grad_sample) -> None:
        old = self.grad_samples.get(param)
        if old is None:
            self.grad_samples[param] = grad_sample
        elif isinstance(old, LinearFactors) and isinstance(grad_sample, LinearFactors):  # a module called twice
            self.grad_samples[param] = old.append(grad_sample)
        else:
            as_tensor = [t.materialise() if isinstance(t, LinearFactors) else t.float() for t in (old, grad_sample)]
            self.grad_samples[param] = as_tensor[0] + as_tensor[1]


class LinearPerSampleProbes:
    """Per-sample gradients of chosen nn.Linear modules computed by autograd itself, for torch.compile.

    Each module gets a zero "probe" P of shape (B_max, out, in) and its output becomes Linear(x) + x_b·P_bᵀ.
    P = 0 leaves the function unchanged and ∂L/∂P_b = ∂L_b/∂W, so autograd writes the per-sample gradients
    into P.grad. Unlike `LinearPerSampleHooks` there is no tensor hook (tensor hooks split torch.compile's
    graph at every hooked layer), and the per-sample tensors are the size of the hooked weights (LoRA-sized
    for LoRA). Under autocast the product runs in the autocast dtype, with fp32 accumulation. The forward
    hooks stay registered for the life of the object (compile traces them once); `pop` reads and clears.
    """

    def __init__(self, modules: dict[str, nn.Linear], max_batch_size: int, include_bias: bool = True):
        self.modules = modules
        self.include_bias = include_bias
        self.probes: dict[nn.Parameter, torch.Tensor] = {}
        for module in modules.values():
            w = module.weight
            self.probes[w] = torch.zeros(max_batch_size, *w.shape, device=w.device, requires_grad=True)
            if self._has_bias(module):
                self.probes[module.bias] = torch.zeros(max_batch_size, *module.bias.shape, device=w.device,
                                                       requires_grad=True)
            module.register_forward_hook(self._forward_hook)

    def _has_bias(self, module) -> bool:
        return self.include_bias and module.bias is not None and module.bias.requires_grad

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def _forward_hook(self, module: nn.Linear, inputs, output):
        if not torch.is_grad_enabled():
            return output
        x = inputs[0]
        b = x.shape[0]
        flat = x.reshape(b, -1, x.shape[-1])
        delta = torch.bmm(flat, self.probes[module.weight][:b].to(flat.dtype).transpose(1, 2))
        if self._has_bias(module):
            delta = delta + self.probes[module.bias][:b].to(delta.dtype)[:, None, :]
        return output + delta.reshape(output.shape).to(output.dtype)

    def pop(self, batch_size: int) -> dict[nn.Parameter, torch.Tensor]:
        """The per-sample gradients of the last backward (first `batch_size` rows), then clear them."""
        out = {}
        for param, probe in self.probes.items():
            if probe.grad is None:
                raise RuntimeError("A hooked module got no per-sample gradient (is it used in the forward pass?).")
            out[param] = probe.grad[:batch_size]
            probe.grad = None
        return out


class OpacusGradSamples:
    """opacus' GradSampleModule as an engine: `model` is the wrapped module to call; fp32 only (docs/design.md §4)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]):
        from opacus import GradSampleModule

        model.train()  # GradSampleModule needs train mode
        self.model = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        self.params = params
        self._warnings = None

    def __enter__(self):
        # opacus hooks the first layer with a full backward hook; its input needs no gradient, so torch warns at
        # every step that grad_input is None. opacus reads only grad_output, so the warning says nothing here.
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                                  "respect to module outputs since no inputs require gradients")
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        return None

    def pop(self, batch_size: int) -> dict[nn.Parameter, torch.Tensor]:
        """Take (and clear) the `grad_sample` opacus left on each trainable tensor."""
        out = {}
        for p in self.params:
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                raise RuntimeError("A trainable tensor got no per-sample gradient from opacus.")
            out[p] = gs.float()
            p.grad_sample = None
        return out


ENGINES = ("auto", "hooks", "probes", "opacus")


def linear_modules_holding(model: nn.Module, params: list[nn.Parameter]) -> dict[str, nn.Linear] | None:
    """The nn.Linear modules that hold trainable tensors, or None when some trainable tensor is elsewhere."""
    modules = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(t.requires_grad for t in m.parameters(recurse=False))}
    covered = {id(t) for m in modules.values() for t in m.parameters(recurse=False)}
    return modules if all(id(p) in covered for p in params) else None


# Attributes holding a dropout probability that a module applies itself (nn.MultiheadAttention's and
# transformers' attention `dropout`, DiT's label `dropout_prob`, ...); nn.Dropout modules are found by type.
DROPOUT_ATTRIBUTES = ("dropout", "dropout_p", "dropout_prob", "attention_dropout", "attn_dropout", "hidden_dropout")


def dropout_modules(model: nn.Module) -> list[tuple[str, float]]:
    """Every place in `model` that draws a dropout mask in train mode, with its probability p > 0."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            p = float(module.p)
        else:
            own = vars(module)  # plain attributes only (no config look-ups through __getattr__)
            p = max((float(own[a]) for a in DROPOUT_ATTRIBUTES
                     if isinstance(own.get(a), (int, float)) and not isinstance(own.get(a), bool)), default=0.0)
        if p > 0:
            found.append((name or "(the model)", p))
    return found


def refuse_dropout(model: nn.Module, what: str = "The model", fix: str = "set its dropout to 0") -> None:
    """DP-SGD and the private selection refuse a model with dropout p > 0: its masks would be randomness inside
    the mechanism drawn from the public seed by batch position (global torch RNG), so one inserted image shifts
    every later image's mask and the clipped sum moves by more than C (tests/test_draws.py measures it)."""
    found = dropout_modules(model)
    if found:
        name, p = found[0]
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise ValueError(f"{what} has dropout (p = {p:g} in {name}{more}): its masks would be randomness inside the "
                         "DP mechanism drawn from the public seed by batch position, so one image could move the "
                         f"clipped sum by more than C. Fix: {fix}.")


def make_engine(name: str, model: nn.Module, params: list[nn.Parameter], *, compile: bool,
                mixed_precision: str | None, max_batch_size: int):
    """The per-sample engine for `params` and the module to call forward on: (engine, model).

    auto: probes under --compile, else hooks; opacus when a trainable tensor is outside nn.Linear. The
    combinations that cannot work are refused with the reason, and so is a model with dropout (`refuse_dropout`).
    """
    if name not in ENGINES:
        raise ValueError(f"Unknown per-sample engine {name!r}; choose from {', '.join(ENGINES)}.")
    refuse_dropout(model)
    linears = linear_modules_holding(model, params)
    if name == "auto":
        name = ("probes" if compile else "hooks") if linears is not None else "opacus"
    if name in ("hooks", "probes") and linears is None:
        raise ValueError(f"--per_sample_engine {name} needs every trainable tensor in an nn.Linear; use opacus.")
    if name == "hooks" and compile:
        raise ValueError("--per_sample_engine hooks cannot run under --compile (tensor hooks break the compiled "
                         "graph): use probes.")
    if name == "opacus" and compile:
        raise ValueError("opacus' GradSampleModule does not run under --compile; drop --compile.")
    if name == "opacus" and mixed_precision not in (None, "no"):
        raise ValueError("opacus per-sample gradients fail under autocast (docs/design.md §4): use --mixed_precision no"
                         + (" or --per_sample_engine hooks." if linears is not None else "."))
    if name == "hooks":
        return LinearPerSampleHooks(linears), model
    if name == "probes":  # registers its forward hooks now, before compile traces them
        return LinearPerSampleProbes(linears, max_batch_size), model
    engine = OpacusGradSamples(model, params)
    return engine, engine.model


CLIPPING_RULES = ("automatic", "flat")
DEFAULT_AUTOMATIC_GAMMA = 0.01  # the official DP-SAPF code's stability constant (Bu et al.'s automatic clipping)


def clip_factors(norms: torch.Tensor, max_grad_norm: float, clipping: str = "flat",
                 gamma: float = DEFAULT_AUTOMATIC_GAMMA) -> torch.Tensor:
    """The factor c_b each sample's gradient is multiplied by; ‖c_b·g_b‖ ≤ C in both rules (the sensitivity).

    flat: c = min(1, C/‖g‖) (Abadi et al.), which clips nothing when C is far above the norms and then scales
    the noise to a norm no gradient has. automatic: c = C/(‖g‖ + γ) (Bu et al. 2023; the official DP-SAPF code,
    γ = 0.01): every sample is rescaled to a norm just under C whatever the model's gradient scale, so the
    noise σC always meets gradients of norm ≈ C. A non-finite sample gets 0.
    """
    if clipping == "flat":
        factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    elif clipping == "automatic":
        if not gamma > 0:
            raise ValueError("automatic clipping needs a stability constant gamma > 0.")
        factors = max_grad_norm / (norms + gamma)
    else:
        raise ValueError(f"Unknown clipping rule {clipping!r}; choose from {', '.join(CLIPPING_RULES)}.")
    return torch.where(torch.isfinite(norms), factors, torch.zeros_like(norms))


def clip_and_accumulate(grad_samples: list[torch.Tensor], sums: list[torch.Tensor], max_grad_norm: float,
                        fused: bool = False, clipping: str = "flat", gamma: float = DEFAULT_AUTOMATIC_GAMMA):
    """sums += Σ_b clip_C(g_b), in place; returns the per-sample norms (B,) and the per-tensor Σ_b ‖clipped g_b‖².

    clip_C(g) = c(‖g‖)·g with the factor of `clip_factors` (flat: min(1, C/‖g‖); automatic: C/(‖g‖ + γ)),
    ‖g‖ the joint norm over all tensors (accumulated in fp32 whatever the dtype of g); a non-finite sample
    contributes zero. `fused` writes the weighted sum as a pointwise product and a reduction, which
    torch.compile turns into one read of each per-sample tensor (eager: use einsum).
    """
    per_tensor = torch.stack([g.squared_norms() if isinstance(g, LinearFactors) else
                              torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=torch.float32) ** 2
                              for g in grad_samples], dim=1)  # (B, tensors), one read of each tensor
    norms = per_tensor.sum(1).sqrt()
    finite = torch.isfinite(norms)
    factors = clip_factors(norms, max_grad_norm, clipping, gamma)
    for total, g in zip(sums, grad_samples):
        if isinstance(g, LinearFactors):
            total.add_(g.weighted_sum(factors))
            continue
        clean = torch.nan_to_num(g.float(), nan=0.0, posinf=0.0, neginf=0.0)
        if fused:
            total.add_((factors.view(-1, *([1] * (g.dim() - 1))) * clean).sum(0))
        else:
            total.add_(torch.einsum("b,b...->...", factors, clean))
    clean_sq = torch.where(finite[:, None], per_tensor, torch.zeros_like(per_tensor))
    return norms, (factors[:, None] ** 2 * clean_sq).sum(0)


class ClippedGradientSum:
    """Σ_i clip_C(g_i) over the samples of one logical batch, with per-tensor sums of squared clipped norms.

    clip_C(g) = g · min(1, C / ‖g‖) (flat) or g · C/(‖g‖ + γ) (automatic) with ‖g‖ the joint norm over all
    tensors; a sample whose gradient is not finite contributes zero (still within the sensitivity C, and
    decided per sample).
    """

    def __init__(self, params: list[torch.Tensor], max_grad_norm: float, track_squared_norms: bool = False,
                 compile: bool = False, accumulate_dtype: torch.dtype = torch.float32, clipping: str = "flat",
                 automatic_gamma: float = DEFAULT_AUTOMATIC_GAMMA):
        if max_grad_norm <= 0:
            raise ValueError("max_grad_norm must be > 0.")
        clip_factors(torch.ones(1), max_grad_norm, clipping, automatic_gamma)  # refuses an unknown rule or γ ≤ 0
        self.clipping, self.automatic_gamma = clipping, float(automatic_gamma)
        self.params = list(params)
        # float64 where exact (noise-free) sums are compared against Δ = C/N (PTR): float32 rounding over N adds
        # can exceed 1% of Δ at N ~ 10⁴
        self.accumulate_dtype = accumulate_dtype
        self.max_grad_norm = float(max_grad_norm)
        self.track_squared_norms = track_squared_norms
        # compiled: a few fused kernels instead of ~6 launches per tensor (the same arithmetic)
        import functools

        self._eager = functools.partial(clip_and_accumulate, clipping=clipping, gamma=self.automatic_gamma)
        if compile:
            self._kernel = torch.compile(functools.partial(self._eager, fused=True), dynamic=True)
        else:
            self._kernel = self._eager
        self.reset()

    def reset(self) -> None:
        """Start a new logical batch."""
        self.sums = [torch.zeros(p.shape, dtype=self.accumulate_dtype, device=p.device) for p in self.params]
        self.squared_norm_sums = torch.zeros(len(self.params), dtype=self.accumulate_dtype, device=self._device())
        self.num_samples = 0

    def _device(self):
        return self.params[0].device if self.params else torch.device("cpu")

    def add(self, grad_samples: dict[torch.Tensor, torch.Tensor], count: int | None = None) -> torch.Tensor:
        """Clip each sample jointly and add it to the sums; returns the unclipped per-sample norms (B,).

        count: how many of the B rows are real samples (the rest are zero padding rows, which add nothing).
        """
        missing = [i for i, p in enumerate(self.params) if p not in grad_samples]
        if missing:
            raise RuntimeError(f"{len(missing)} trainable tensors got no per-sample gradient (are they used in the "
                               "forward pass, with hooks active?).")
        batch = [grad_samples[p] for p in self.params]
        kernel = self._eager if any(isinstance(g, LinearFactors) for g in batch) else self._kernel
        norms, squared = kernel(batch, self.sums, self.max_grad_norm)
        if self.track_squared_norms:  # (float32 products, added in the accumulation dtype)
            self.squared_norm_sums.add_(squared)
        self.num_samples += int(batch[0].shape[0]) if count is None else count
        return norms

    def all_reduce(self, accelerator=None) -> None:
        """Sum the clipped sums (and sample counts) over processes; each process clipped only its own samples."""
        if accelerator is None or accelerator.num_processes == 1:
            return
        count = torch.tensor([float(self.num_samples)], device=self.squared_norm_sums.device)
        flat = torch.cat([s.flatten() for s in self.sums] + [self.squared_norm_sums, count])
        flat = accelerator.reduce(flat, reduction="sum")
        offset = 0
        for s in self.sums:
            s.copy_(flat[offset:offset + s.numel()].view_as(s))
            offset += s.numel()
        self.squared_norm_sums.copy_(flat[offset:-1])
        self.num_samples = int(flat[-1].item())

    def noisy_sums(self, noise_multiplier: float, generator: torch.Generator | None) -> list[torch.Tensor]:
        """The sums plus N(0, (σ·C)²) per coordinate; call after `all_reduce`, with the same generator on all ranks."""
        if noise_multiplier == 0:
            return [s.clone() for s in self.sums]
        std = noise_multiplier * self.max_grad_norm
        return [s + std * torch.randn(s.shape, generator=generator, device=generator.device,
                                       dtype=torch.float32).to(s.device) for s in self.sums]


def group_rows(grad_samples: dict, multiplicity: int) -> dict:
    """Per-row gradients -> per-sample gradients: each run of `multiplicity` consecutive rows is one sample's
    copies (`data.micro_batches`), and their gradients add up (the loss already carries the 1/K of the mean).

    A factored weight gradient is regrouped, not materialised: a sample's K copies are K·T tokens of one
    `LinearFactors`, since Σ_k g_kᵀx_k = [g_1 … g_K]ᵀ[x_1 … x_K].
    """
    if multiplicity == 1:
        return grad_samples
    out = {}
    for param, g in grad_samples.items():
        if isinstance(g, LinearFactors):
            rows, tokens = g.x.shape[:2]
            out[param] = LinearFactors(g.x.reshape(rows // multiplicity, multiplicity * tokens, g.x.shape[-1]),
                                       g.g.reshape(rows // multiplicity, multiplicity * tokens, g.g.shape[-1]))
        else:
            out[param] = g.reshape(g.shape[0] // multiplicity, multiplicity, *g.shape[1:]).sum(1)
    return out


def accumulate_clipped(loss_fn, batches, engine: PerSampleEngine, clipped: "ClippedGradientSum", params=(),
                       progress=None, multiplicity: int = 1):
    """The one loop over micro-batches: per-sample losses, backward of their sum, clipped add of each sample.

    `loss_fn(*batch)` returns one loss per row (shape (B·K,)), never an average across samples, so each
    per-sample gradient is that of its own loss. With noise multiplicity K the rows come in runs of K copies of
    one sample (`data.micro_batches`): the sample's loss is the mean of its K rows, and its gradient, the sum
    of its rows' gradients (`group_rows`), is clipped once, so the sensitivity is C whatever K is. A batch may
    carry a fifth element, CPU weights of its rows (0: a padding row, whose loss and gradient are zero): only
    the real samples are counted. Returns this process's summed per-sample loss (no host sync).
    """
    loss_sum = None
    with engine:
        for batch in batches:
            size = batch[0].shape[0]
            real = int(batch[4].sum()) if len(batch) > 4 else size
            if real == 0:
                continue
            if size % multiplicity or real % multiplicity:
                raise ValueError(f"A micro-batch of {size} rows ({real} real) does not hold whole samples of "
                                 f"{multiplicity} copies each.")
            losses = loss_fn(*batch).view(-1, multiplicity).mean(1)
            losses.sum().backward()
            clipped.add(group_rows(engine.pop(size), multiplicity), count=real // multiplicity)
            for p in params:
                p.grad = None
            loss_sum = losses.detach().sum() if loss_sum is None else loss_sum + losses.detach().sum()
            if progress is not None:
                progress(real // multiplicity)
    return loss_sum


class StepGradients:
    """One logical batch -> the gradient the optimizer applies (training, benchmarks and the audit share this).

    Private: per-sample gradients (an engine), joint clip (`clipping`: flat or automatic), sum over micro-batches
    and processes, noise N(0, σ²C²) once, division by the expected batch B. Non-private: the plain mean over the
    realised batch. With `multiplicity` K each sample's loss is the mean over its K rows (`data.micro_batches`).
    """

    def __init__(self, loss_fn, params: list[nn.Parameter], *, private: bool, max_grad_norm: float,
                 engine=None, accelerator=None, compile: bool = False, clipping: str = "flat",
                 automatic_gamma: float = DEFAULT_AUTOMATIC_GAMMA, multiplicity: int = 1):
        if private and engine is None:
            raise ValueError("A private step needs a per-sample engine.")
        if multiplicity < 1:
            raise ValueError("The noise multiplicity K must be at least 1.")
        self.loss_fn, self.params, self.private = loss_fn, params, private
        self.engine, self.accelerator, self.multiplicity = engine, accelerator, int(multiplicity)
        self.clipped = ClippedGradientSum(params, max_grad_norm, compile=compile and private, clipping=clipping,
                                          automatic_gamma=automatic_gamma)

    def __call__(self, batches, *, noise_multiplier: float, noise_generator: torch.Generator | None,
                 expected_batch_size: int, realised_batch_size: int) -> torch.Tensor:
        """Set p.grad for every trainable tensor; return this process's summed loss (no host sync)."""
        self.clipped.reset()
        if self.private:
            loss_sum = accumulate_clipped(self.loss_fn, batches, self.engine, self.clipped, self.params,
                                          multiplicity=self.multiplicity)
            self.clipped.all_reduce(self.accelerator)
            noisy = self.clipped.noisy_sums(noise_multiplier, noise_generator)
            for p, s in zip(self.params, noisy):
                p.grad = s / expected_batch_size  # the expected batch, not the realised one
        else:
            loss_sum = None
            for batch in batches:
                losses = self.loss_fn(*batch).view(-1, self.multiplicity).mean(1)
                losses.sum().backward()
                loss_sum = losses.detach().sum() if loss_sum is None else loss_sum + losses.detach().sum()
            for p in self.params:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if self.accelerator is not None and self.accelerator.num_processes > 1:
                    grad = self.accelerator.reduce(grad, reduction="sum")
                p.grad = grad / max(1, realised_batch_size)
        return loss_sum if loss_sum is not None else torch.zeros((), device=self.params[0].device)
