"""Privacy accounting of DP-SAPF: the one place every ε of the project comes from.

Two mechanisms compose (add/remove one image; N, prompts and the public model are public):
- selection, one of (`SELECTION_MECHANISMS`, the paper §6.4):
  gaussian: one Gaussian mechanism with noise multiplier σ_s, RDP ε(α) = α / (2σ_s²); over a Poisson
    subsample of rate q_s < 1 (select_salient.py --selection_sample_rate), one Poisson-subsampled Gaussian step;
  exponential: k-fold peeling exponential mechanism (one-shot Gumbel top-k), ε_s/k per pick, each pick
    ε_s/k-bounded-range hence (ε_s/k)²/8-zCDP (Cesar & Rogers 2021): RDP ε(α) = α·ε_s²/(8k); pure ε_s-DP;
  ptr: propose-test-release, (ε_p, δ_p)-DP, added to the training's ε by basic composition (training is
    accounted at δ − δ_p);
- training: T steps of the Poisson-subsampled Gaussian with rate q and noise multiplier σ.

`rdp` (default, as the paper) adds the two RDP curves order by order (opacus' analysis) and converts with
opacus' `get_privacy_spent`. Orders are integers only: there opacus' subsampled-Gaussian RDP equals google's
dp-accounting to float precision (tests/test_privacy.py), whereas at fractional orders the two libraries
disagree by up to ~17% (dp-accounting is the more conservative), so we do not rely on them.
`prv` (opacus) and `pld` (dp-accounting) are tighter numerical accountants of the same composition.

    python -m dp_sapf.privacy --dataset_size 45000 --train_batch_size 4096 --max_train_steps 1000 \
        --target_epsilon 10 --selection_noise_multiplier 5
"""

from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

RDP_ORDERS = tuple(float(a) for a in list(range(2, 65)) + [72, 80, 96, 128, 192, 256, 384, 512, 1024])
ACCOUNTANTS = ("rdp", "prv", "pld")


class PrivacyBudgetError(ValueError):
    """The requested (ε, δ) cannot be met with these settings."""


SELECTION_MECHANISMS = ("gaussian", "exponential", "ptr")
DATA_FREE_SCORERS = ("synflow", "random")  # the scorers that read no image (saliency.py imports this)


@dataclass(frozen=True)
class SelectionCost:
    """The saliency selection as the accountant sees it.

    mechanism: gaussian (noise_multiplier σ_s; 0 = no noise, ε = inf), exponential (epsilon = ε_s of all
    num_picks picks), ptr (epsilon, delta of the test) or none (data-independent: free). The other fields
    describe the mask's query for reports.
    """

    noise_multiplier: float | None
    mechanism: str = "gaussian"
    max_grad_norm: float | None = None
    scorer: str | None = None
    dataset_size: int | None = None
    epsilon: float | None = None
    delta: float | None = None
    num_picks: int | None = None
    sample_rate: float | None = None  # gaussian only: q_s of a Poisson-subsampled query (None: every image)

    @property
    def subsampled(self) -> bool:
        return self.mechanism == "gaussian" and self.sample_rate is not None and self.sample_rate < 1

    @property
    def free(self) -> bool:
        """Data-independent: no cost (a Gaussian selection without a σ_s is one too)."""
        return self.mechanism == "none" or (self.mechanism == "gaussian" and self.noise_multiplier is None)

    @property
    def noiseless(self) -> bool:
        """A Gaussian selection without noise: exact scores were released, so nothing is private."""
        return self.mechanism == "gaussian" and self.noise_multiplier == 0

    def rdp(self, orders: np.ndarray) -> np.ndarray:
        """The RDP curve of the part accounted in RDP (ptr has none: it is (ε, δ), see `approximate_dp`)."""
        if self.free or self.mechanism == "ptr":
            return np.zeros_like(orders)
        if self.mechanism == "exponential":
            return orders * self.epsilon ** 2 / (8.0 * self.num_picks)
        if self.noise_multiplier == 0:
            return np.full_like(orders, np.inf)
        if self.subsampled:
            return _training_rdp(self.noise_multiplier, self.sample_rate, 1, orders)
        with np.errstate(divide="ignore", over="ignore"):  # an absurd σ_s gives inf, refused by the ledger
            return orders / (2.0 * self.noise_multiplier ** 2)

    def approximate_dp(self, accountant: str) -> tuple[float, float]:
        """(ε, δ) added to the rest by basic composition: ptr always; the exponential mechanism's pure ε_s under
        the numerical accountants (prv/pld take Gaussian events only)."""
        if self.mechanism == "ptr":
            return self.epsilon, self.delta
        if self.mechanism == "exponential" and accountant != "rdp":
            return self.epsilon, 0.0
        return 0.0, 0.0

    @classmethod
    def from_mask(cls, mask: dict | None) -> "SelectionCost | None":
        """The one place a mask's privacy record is read (None: no selection stage at all).

        Nothing is inferred: the record names its mechanism and carries every figure of its cost, or it is a
        ValueError naming the field (saliency.read_mask has checked the whole mask against its schema first).
        A mask is free ("none") only when its scorer reads no data.
        """
        if mask is None:
            return None
        record = mask.get("privacy") if isinstance(mask, dict) else None
        if not isinstance(record, dict):
            raise ValueError("The mask has no 'privacy' record: its selection cost is unknown.")
        mechanism, scorer = record.get("mechanism"), mask.get("scorer")
        if mechanism == "dp_sgd_postprocessing":
            raise ValueError(
                f"This mask was chosen from the noisy gradients of the first {record.get('warmup_steps')} DP-SGD steps "
                "of one train_dp_sapf.py run (--lora_target warmup_select): it is free only inside that run, whose "
                "training accounts those steps. Another run on it would spend them again unaccounted; rerun with "
                "--lora_target warmup_select, or select with select_salient.py.")
        if mechanism not in SELECTION_MECHANISMS + ("none",):
            raise ValueError(f"The mask's field 'privacy.mechanism' is {mechanism!r}; expected one of "
                             f"{', '.join(SELECTION_MECHANISMS + ('none',))}.")
        if (mechanism == "none") != (scorer in DATA_FREE_SCORERS):
            raise ValueError(f"The mask's scorer {scorer!r} does not match its field 'privacy.mechanism' {mechanism!r}: "
                             f"only a data-free scorer ({', '.join(DATA_FREE_SCORERS)}) selects for free.")
        needed = {"gaussian": ("noise_multiplier", "max_grad_norm", "dataset_size"),
                  "exponential": ("epsilon", "num_picks", "max_grad_norm", "dataset_size"),
                  "ptr": ("epsilon", "delta", "max_grad_norm", "dataset_size"), "none": ()}[mechanism]
        for name in needed:
            value = record.get(name)
            # σ_s = 0 is a declared exact (non-private) mask; a zero ε_s, δ_s, C_s or N would read as a free selection
            positive = name != "noise_multiplier"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    value < 0 or (positive and value == 0) or (name == "delta" and value >= 1):
                raise ValueError(f"The mask's field 'privacy.{name}' is {value!r}: a {mechanism} selection needs it "
                                 f"(a finite number{' > 0' if positive else ' >= 0'}) to account its cost.")
        if mechanism == "none":
            return cls(None, "none", scorer=scorer)
        rate = record.get("sample_rate")
        if rate is not None and (mechanism != "gaussian" or isinstance(rate, bool) or not isinstance(rate, (int, float))
                                 or not 0 < rate <= 1):
            raise ValueError(f"The mask's field 'privacy.sample_rate' is {rate!r}: a Poisson-subsampled selection "
                             "needs a rate in (0, 1], and only the gaussian mechanism has one.")
        return cls(record.get("noise_multiplier"), mechanism, record.get("max_grad_norm"), scorer,
                   record.get("dataset_size"), record.get("epsilon"), record.get("delta"), record.get("num_picks"),
                   None if rate is None else float(rate))


def finite_or_none(value):
    """A figure for strict JSON: a finite number as is; inf, nan (and None) as None."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def default_selection_delta(dataset_size: int) -> float:
    """δ_s of PTR: a tenth of the default δ = 1/N, leaving 0.9/N for training."""
    return 0.1 / dataset_size


def planned_selection(mechanism: str, *, noise_multiplier: float | None, epsilon: float | None,
                      delta: float | None, num_picks: int, dataset_size: int,
                      sample_rate: float | None = None) -> SelectionCost | None:
    """The SelectionCost of a planned selection (None: a Gaussian one without σ_s, i.e. no selection stage)."""
    if sample_rate is not None and mechanism != "gaussian":
        raise ValueError("--selection_sample_rate subsamples the Gaussian query; the exponential and PTR "
                         "mechanisms read every image.")
    if mechanism == "gaussian":
        return None if noise_multiplier is None else SelectionCost(
            check_noise_multiplier(noise_multiplier, "--selection_noise_multiplier"),
            sample_rate=None if sample_rate is None or sample_rate >= 1 else float(sample_rate))
    if mechanism == "ptr" and delta is None:
        delta = default_selection_delta(dataset_size)
    check_selection_budget(mechanism, epsilon, delta, num_picks)
    return SelectionCost(None, mechanism, epsilon=epsilon, delta=delta if mechanism == "ptr" else None,
                         num_picks=num_picks if mechanism == "exponential" else None)


def check_selection_budget(mechanism: str, epsilon: float | None, delta: float | None, num_picks: int) -> None:
    """Flags of the exponential and PTR mechanisms: a finite ε > 0, and for PTR δ in (0, 1)."""
    if mechanism not in SELECTION_MECHANISMS:
        raise ValueError(f"Unknown --selection_mechanism {mechanism!r}; choose from {', '.join(SELECTION_MECHANISMS)}.")
    if mechanism == "gaussian":
        return
    if epsilon is None or not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"--selection_mechanism {mechanism} needs --selection_epsilon, a finite number > 0 "
                         f"(got {epsilon}).")
    if mechanism == "ptr" and (delta is None or not 0 < delta < 1):
        raise ValueError(f"--selection_delta must be in (0, 1), got {delta}.")
    if num_picks < 1:
        raise ValueError("The selection must pick at least one candidate.")


def parse_target_epsilon(text: str | float) -> float:
    """--target_epsilon: a positive number, or inf / infinity / 1e999 for the documented non-private path."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"--target_epsilon must be a number or 'inf', got {text!r}.") from None
    if math.isnan(value) or value <= 0:
        raise ValueError(f"--target_epsilon must be > 0 (or 'inf' to train without privacy), got {text!r}.")
    return value


def check_noise_multiplier(sigma: float, flag: str = "--noise_multiplier") -> float:
    """σ must be a finite number > 0 (no noise is --no_dp, said out loud)."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{flag} must be a finite number > 0, got {sigma}. To train without privacy use --no_dp.")
    return float(sigma)


def check_delta(delta: float) -> float:
    """δ must lie in (0, 1): δ ≥ 1 promises nothing, and ε(δ) is undefined there."""
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"--target_delta must be in (0, 1), got {delta}; the default 1/N (or smaller) is advised.")
    return float(delta)


@dataclass
class PrivacySpent:
    """ε of the composed release and how it splits between the two stages.

    selection_share (rdp): the selection's RDP over the total RDP at the order that gives ε;
    (prv/pld): 1 - ε_training_only / ε, clipped to [0, 1].
    """

    epsilon: float
    delta: float
    accountant: str
    best_alpha: float | None
    epsilon_selection_only: float
    epsilon_training_only: float
    selection_share: float

    def to_dict(self) -> dict:
        return asdict(self)


def default_delta(dataset_size: int) -> float:
    """δ = 1/N, the paper's choice (the official code used 1/(N ln N) silently; we say what we use)."""
    return 1.0 / dataset_size


def warn_if_delta_too_large(delta: float, dataset_size: int) -> None:
    """δ above 1/N allows mechanisms that publish one whole record: warn loudly."""
    if delta > 1.0 / dataset_size:
        warnings.warn(f"δ = {delta:.3g} exceeds 1/N = {1 / dataset_size:.3g}: a mechanism that publishes a random "
                      "image outright would satisfy this guarantee. Use δ ≤ 1/N.", stacklevel=2)


def _selection_rdp(selection: SelectionCost | None, orders: np.ndarray) -> np.ndarray:
    return np.zeros_like(orders) if selection is None else selection.rdp(orders)


def _training_rdp(noise_multiplier: float, sample_rate: float, steps: int, orders: np.ndarray) -> np.ndarray:
    from opacus.accountants.analysis.rdp import compute_rdp

    if steps == 0 or sample_rate == 0:
        return np.zeros_like(orders)
    if noise_multiplier == 0:
        return np.full_like(orders, np.inf)
    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps,
                                  orders=list(orders)), dtype=float)


def _rdp_epsilon(rdp: np.ndarray, orders: np.ndarray, delta: float) -> tuple[float, float]:
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if np.all(rdp == 0):
        return 0.0, float("nan")
    if not np.any(np.isfinite(rdp)):
        return float("inf"), float("nan")
    with warnings.catch_warnings():  # "optimal order is the largest/smallest alpha": expected at extreme σ
        warnings.filterwarnings("ignore", message="Optimal order")
        eps, alpha = get_privacy_spent(orders=list(orders), rdp=list(rdp), delta=delta)
    return float(eps), float(alpha)


def _dp_event(noise_multiplier, sample_rate, steps, selection):
    from dp_accounting import dp_event

    events = []
    if selection is not None and not selection.free:
        query = dp_event.GaussianDpEvent(selection.noise_multiplier)
        events.append(dp_event.PoissonSampledDpEvent(selection.sample_rate, query) if selection.subsampled else query)
    if steps > 0 and sample_rate > 0:
        events.append(dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier)), steps))
    return dp_event.ComposedDpEvent(events)


def _numerical_epsilon(accountant, noise_multiplier, sample_rate, steps, delta, selection) -> float:
    """ε from the PRV (opacus) or PLD (dp-accounting) accountant."""
    has_selection = selection is not None and not selection.free  # only Gaussian selections get here
    if (has_selection and selection.noise_multiplier == 0) or (steps > 0 and sample_rate > 0 and noise_multiplier == 0):
        return float("inf")
    if not has_selection and (steps == 0 or sample_rate == 0):
        return 0.0
    if accountant == "pld":
        from dp_accounting.pld import PLDAccountant

        acc = PLDAccountant()
        acc.compose(_dp_event(noise_multiplier, sample_rate, steps, selection))
        return float(acc.get_epsilon(delta))
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = ([(selection.noise_multiplier, selection.sample_rate if selection.subsampled else 1.0, 1)]
                   if has_selection else []) + (
        [(noise_multiplier, sample_rate, steps)] if steps > 0 and sample_rate > 0 else [])
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(acc.get_epsilon(delta))


def compute_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    selection: SelectionCost | None = None, accountant: str = "rdp") -> PrivacySpent:
    """ε of selection + T training steps at δ, with the split between the stages.

    A selection with an (ε_s, δ_s) part (`SelectionCost.approximate_dp`) adds ε_s to the ε of the rest at
    δ − δ_s (basic composition); everything else composes inside the accountant.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"Unknown accountant {accountant!r}; choose from {', '.join(ACCOUNTANTS)}.")
    if not 0 <= sample_rate <= 1:
        raise ValueError(f"The sample rate must be in [0, 1], got {sample_rate}.")
    eps_add, delta_add = (0.0, 0.0) if selection is None or selection.free else selection.approximate_dp(accountant)
    if eps_add == 0 and delta_add == 0:
        return _composed_epsilon(noise_multiplier, sample_rate, steps, delta, selection, accountant)
    if delta_add >= delta:
        raise PrivacyBudgetError(f"The selection's δ_s = {delta_add:.3g} leaves nothing of δ = {delta:.3g} for "
                                 "training: lower --selection_delta.")
    rest = _composed_epsilon(noise_multiplier, sample_rate, steps, delta - delta_add, None, accountant)
    eps = rest.epsilon + eps_add
    share = eps_add / eps if math.isfinite(eps) and eps > 0 else 0.0
    return PrivacySpent(eps, delta, accountant, rest.best_alpha, eps_add, rest.epsilon_training_only, share)


def _composed_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                      selection: SelectionCost | None, accountant: str) -> PrivacySpent:
    """ε of an RDP- (or numerically) composed selection and training."""
    orders = np.asarray(RDP_ORDERS)
    sel, train = _selection_rdp(selection, orders), _training_rdp(noise_multiplier, sample_rate, steps, orders)
    eps_sel, _ = _rdp_epsilon(sel, orders, delta)
    if selection is not None and selection.mechanism == "exponential":  # alone it is also pure ε_s-DP
        eps_sel = min(eps_sel, selection.epsilon)
    eps_train, _ = _rdp_epsilon(train, orders, delta)
    if accountant == "rdp":
        total = sel + train
        eps, alpha = _rdp_epsilon(total, orders, delta)
        if math.isfinite(eps) and eps > 0:
            i = int(np.argmin(np.abs(orders - alpha)))
            share = float(sel[i] / total[i]) if total[i] > 0 else 0.0
        else:
            share = float(eps_sel == float("inf"))
        return PrivacySpent(eps, delta, accountant, alpha, eps_sel, eps_train, share)
    eps = _numerical_epsilon(accountant, noise_multiplier, sample_rate, steps, delta, selection)
    eps_sel_n = _numerical_epsilon(accountant, 0.0, 0.0, 0, delta, selection)
    eps_train_n = _numerical_epsilon(accountant, noise_multiplier, sample_rate, steps, delta, None)
    share = 0.0 if eps == 0 or not math.isfinite(eps) else min(1.0, max(0.0, 1 - eps_train_n / eps))
    return PrivacySpent(eps, delta, accountant, None, eps_sel_n, eps_train_n, share)


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               selection: SelectionCost | None = None, accountant: str = "rdp",
                               rel_tolerance: float = 1e-4, max_sigma: float = 1e4) -> float:
    """The smallest σ (to rel_tolerance) whose composed ε is ≤ target; refuses unreachable targets."""
    if math.isinf(target_epsilon):
        return 0.0
    if target_epsilon <= 0:
        raise PrivacyBudgetError("The target ε must be > 0.")

    def eps(sigma):
        return compute_epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta,
                               selection=selection, accountant=accountant).epsilon

    floor = compute_epsilon(noise_multiplier=max_sigma, sample_rate=sample_rate, steps=0, delta=delta,
                            selection=selection, accountant=accountant).epsilon
    if floor >= target_epsilon:
        raise PrivacyBudgetError(
            f"The saliency selection alone spends ε = {floor:.4g} at δ = {delta:.3g}, which already meets or exceeds "
            f"the target ε = {target_epsilon}. Spend less on it (a larger --selection_noise_multiplier σ_s, a smaller "
            "--selection_epsilon), raise the target, or use a data-independent mask (--scorer random or synflow).")
    if steps == 0 or sample_rate == 0:
        return 0.0
    if eps(max_sigma) > target_epsilon:
        raise PrivacyBudgetError(f"ε = {target_epsilon} cannot be met even with σ = {max_sigma}: lower the steps or "
                                 "the batch, or raise the target.")
    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
    while hi - lo > rel_tolerance * hi:
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass
class PrivacyLedger:
    """What a training run has spent and will spend; saved in checkpoints, checked on resume.

    noise_multiplier 0 means a non-private run (--no_dp): ε = inf, reported as such everywhere, as is a run
    whose mask was selected without noise.
    """

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    delta: float
    accountant: str
    steps_done: int
    total_steps: int
    selection: SelectionCost | None = field(default=None)

    @classmethod
    def plan(cls, *, dataset_size: int, expected_batch_size: int, steps: int, max_grad_norm: float,
             accountant: str = "rdp", delta: float | None = None, target_epsilon: float | None = None,
             noise_multiplier: float | None = None, selection: SelectionCost | None = None) -> "PrivacyLedger":
        """Calibrate σ to the target (or take the given σ; neither: non-private). Refuses unreachable targets."""
        q = expected_batch_size / dataset_size
        delta = check_delta(delta if delta is not None else default_delta(dataset_size))
        warn_if_delta_too_large(delta, dataset_size)
        if noise_multiplier is not None:
            sigma = check_noise_multiplier(noise_multiplier)
        elif target_epsilon is not None and math.isfinite(target_epsilon):
            sigma = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=q, steps=steps,
                                               selection=selection, accountant=accountant)
        else:
            sigma = 0.0
        ledger = cls(noise_multiplier=sigma, sample_rate=q, max_grad_norm=max_grad_norm, delta=delta,
                     accountant=accountant, steps_done=0, total_steps=steps, selection=selection)
        try:
            final = ledger.epsilon_final() if ledger.private else 0.0
        except (ZeroDivisionError, OverflowError, FloatingPointError):  # opacus' RDP divides by σ²
            final = float("inf")
        if not math.isfinite(final):
            # a positive but absurd σ (e.g. 1e-200) or σ_s would otherwise report "private: true, epsilon: null"
            raise ValueError(f"σ = {sigma:.3g} (selection σ_s = {getattr(selection, 'noise_multiplier', None)}) gives no "
                             "finite ε at this δ: that is no privacy guarantee. Use a larger noise multiplier, a "
                             "--target_epsilon, or --no_dp to train without privacy, said out loud.")
        return ledger

    @property
    def private(self) -> bool:
        """False for --no_dp, and for a mask selected without noise (σ_s = 0): either voids the guarantee."""
        noiseless_selection = self.selection is not None and self.selection.noiseless
        return self.noise_multiplier > 0 and not noiseless_selection

    def spent(self, steps: int | None = None) -> PrivacySpent:
        """ε of the selection and `steps` training steps (default: those done), with the split."""
        steps = self.steps_done if steps is None else steps
        if not self.private:
            return PrivacySpent(float("inf"), self.delta, self.accountant, None, float("nan"), float("inf"), 0.0)
        return compute_epsilon(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=steps,
                               delta=self.delta, selection=self.selection, accountant=self.accountant)

    def epsilon_spent(self) -> float:
        """ε of the selection and the steps done so far."""
        return self.spent().epsilon

    def epsilon_final(self) -> float:
        """ε once all planned steps are done."""
        return self.spent(self.total_steps).epsilon

    def report(self, **context) -> dict:
        """privacy_report.json: every figure needed to check or recompute the guarantee (schema: REPORT_FIELDS).

        Strict JSON: a non-private release has no finite ε, and its "epsilon" is null ("private": false says why).
        """
        spent = self.spent()
        selection = self.selection
        return {
            "private": self.private,
            "epsilon": finite_or_none(spent.epsilon),
            "delta": self.delta,
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm if self.private else None,
            "sample_rate": self.sample_rate,
            "steps": self.steps_done,
            "selection_mechanism": None if selection is None else selection.mechanism,
            "selection_noise_multiplier": None if selection is None else selection.noise_multiplier,
            "selection_epsilon": None if selection is None else selection.epsilon,
            "selection_delta": None if selection is None else selection.delta,
            "selection_max_grad_norm": None if selection is None else selection.max_grad_norm,
            "selection_sample_rate": None if selection is None or not selection.subsampled else selection.sample_rate,
            "budget_split": {} if not self.private else {
                "epsilon_selection_only": finite_or_none(spent.epsilon_selection_only),
                "epsilon_training_only": finite_or_none(spent.epsilon_training_only),
                "selection_share": finite_or_none(spent.selection_share),
                "best_alpha": finite_or_none(spent.best_alpha)},
            "neighbouring": "add/remove one image; N, class names, class prompts and the base model are public",
            **context,
        }

    def state_dict(self) -> dict:
        state = asdict(self)
        state["selection"] = None if self.selection is None else asdict(self.selection)
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "PrivacyLedger":
        state = dict(state)
        if state.get("selection") is not None:
            state["selection"] = SelectionCost(**state["selection"])
        return cls(**state)

    def check_compatible(self, other: "PrivacyLedger") -> None:
        """A resumed run must keep every privacy parameter; name the first that changed."""
        for name in ("noise_multiplier", "sample_rate", "max_grad_norm", "delta", "accountant", "total_steps",
                     "selection"):
            a, b = getattr(self, name), getattr(other, name)
            same = math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) and isinstance(b, float) else a == b
            if not same:
                raise ValueError(f"Cannot resume: the privacy parameter {name!r} changed ({a!r} in the checkpoint, "
                                 f"{b!r} now). Resume with the same privacy flags, or start a new run.")


# The keys of privacy_report.json (written by `PrivacyLedger.report`, read by hub.py and sample.py).
REPORT_FIELDS = {
    "private": "False for --no_dp / --target_epsilon inf: no guarantee at all",
    "epsilon": "ε of the whole release (selection + training); null when not private (no finite ε)",
    "delta": "δ", "accountant": "rdp | prv | pld",
    "noise_multiplier": "σ of DP-SGD", "max_grad_norm": "C", "sample_rate": "q = B/N", "steps": "T done",
    "selection_mechanism": "gaussian | exponential | ptr | none (data-independent); None: no selection stage",
    "selection_noise_multiplier": "σ_s of a Gaussian selection (None otherwise)",
    "selection_epsilon": "ε_s of an exponential (pure, all picks) or PTR selection",
    "selection_delta": "δ_s of a PTR selection (training is accounted at δ − δ_s)",
    "selection_max_grad_norm": "C_s",
    "selection_sample_rate": "q_s of a Gaussian selection over a Poisson subsample (None: every image)",
    "budget_split": "ε of each stage alone and the selection's share",
    "neighbouring": "the neighbouring relation",
    "dataset_size": "N", "expected_batch_size": "B", "target_epsilon": "the requested ε",
    "train_mode": "lora | direct | full", "lora_target": "mask | all_attention", "rank": "LoRA rank",
    "mask": "the mask's public fields", "base_model": "the public model", "resolution": "training resolution",
    "class_names": "the public class list", "class_prompts": "one prompt per class",
    "backbone": "sd | sd3 | dit", "pipeline_class": "the base pipeline's diffusers class",
    "base_signature": "mean |w| of a few base-model tensors: sample.py refuses the LoRA on another base model",
    "clipping": "rule (flat: g·min(1, C/‖g‖); automatic: g·C/(‖g‖ + γ)), C and γ; either way ‖clipped g‖ ≤ C",
    "noise_multiplicity": "K: each sample's loss averaged over K secret draws before its one clip (privacy unchanged)",
}


def main(argv=None):
    from .atomic import dumps_json
    from .cli import COUNT, FRACTION, POSITIVE, PROBABILITY, ArgumentParser

    parser = ArgumentParser(prog="python -m dp_sapf.privacy", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_size", type=COUNT, required=True, help="N, the number of sensitive images.")
    parser.add_argument("--train_batch_size", type=COUNT, default=4096, help="Expected logical batch B (q = B/N).")
    parser.add_argument("--max_train_steps", type=COUNT, default=1000, help="DP-SGD steps T.")
    parser.add_argument("--target_epsilon", type=str, default=None,
                        help="Target ε: σ is calibrated to meet it ('inf': no noise, not private).")
    parser.add_argument("--noise_multiplier", type=POSITIVE, default=None, help="σ given: ε is reported.")
    parser.add_argument("--target_delta", type=PROBABILITY, default=None, help="δ (default 1/N).")
    parser.add_argument("--selection_mechanism", choices=SELECTION_MECHANISMS, default="gaussian",
                        help="gaussian (σ_s, the paper's default), exponential (ε_s over --num_selected picks) or "
                             "ptr (ε_s, δ_s), as select_salient.py.")
    parser.add_argument("--selection_noise_multiplier", type=POSITIVE, default=None,
                        help="σ_s of a Gaussian selection; absent (or with --no_selection) = no selection stage.")
    parser.add_argument("--selection_epsilon", type=POSITIVE, default=None,
                        help="ε_s of an exponential or PTR selection.")
    parser.add_argument("--selection_delta", type=PROBABILITY, default=None,
                        help="δ_s of a PTR selection (default 1/(10N)); training gets δ − δ_s.")
    parser.add_argument("--selection_sample_rate", type=FRACTION, default=None,
                        help="q_s of a Gaussian selection over a Poisson subsample (default: every image).")
    parser.add_argument("--num_selected", type=COUNT, default=29,
                        help="k, the exponential mechanism's number of picks (SD-v1.5: ⌈0.3·96⌉ = 29).")
    parser.add_argument("--no_selection", action="store_true", help="No selection stage (e.g. random mask, DP-LoRA).")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp", help="rdp (as the paper), prv or pld.")
    args = parser.parse_args(argv)
    if (args.target_epsilon is None) == (args.noise_multiplier is None):
        parser.error("Give exactly one of --target_epsilon or --noise_multiplier.")
    if args.selection_mechanism != "gaussian" and args.selection_noise_multiplier is not None:
        parser.error(f"--selection_noise_multiplier is σ_s of the Gaussian selection; --selection_mechanism "
                     f"{args.selection_mechanism} does not use it.")
    if args.dataset_size < 1 or not 1 <= args.train_batch_size <= args.dataset_size:
        parser.error("Need 1 <= --train_batch_size <= --dataset_size.")
    try:
        selection = None if args.no_selection else planned_selection(
            args.selection_mechanism, noise_multiplier=args.selection_noise_multiplier, epsilon=args.selection_epsilon,
            delta=args.selection_delta, num_picks=args.num_selected, dataset_size=args.dataset_size,
            sample_rate=args.selection_sample_rate)
        ledger = PrivacyLedger.plan(
            dataset_size=args.dataset_size, expected_batch_size=args.train_batch_size, steps=args.max_train_steps,
            max_grad_norm=1.0, accountant=args.accountant, delta=args.target_delta,
            target_epsilon=None if args.target_epsilon is None else parse_target_epsilon(args.target_epsilon),
            noise_multiplier=args.noise_multiplier, selection=selection)
    except ValueError as err:  # PrivacyBudgetError included
        parser.exit(2, f"error: {err}\n")
    spent = ledger.spent(ledger.total_steps)
    out = {"noise_multiplier": ledger.noise_multiplier, "sample_rate": ledger.sample_rate, "steps": ledger.total_steps,
           "dataset_size": args.dataset_size, "selection": None if selection is None else asdict(selection),
           **spent.to_dict()}
    print(dumps_json({k: finite_or_none(v) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
