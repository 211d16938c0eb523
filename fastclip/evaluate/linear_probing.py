"""Linear probes: multinomial logistic regression on frozen features, the CLIP paper's protocol (appendix A.3).

The objective is scikit-learn's for `LogisticRegression(C=C)`, normalised by the sample count:

    mean_i cross_entropy(x_i W + b, y_i) + ||W||^2 / (2 C N)        (the bias is not penalised)

solved by full-batch L-BFGS, either in PyTorch (default: no extra dependency, float64 on the CPU and
float32 on a GPU for large feature sets) or by scikit-learn itself (`solver="sklearn"`, as the paper did).

C is chosen as the paper describes: a log grid (by default 1e-6 .. 1e6 in half-decade steps) scored on a
validation split held out of the training set, then the interval around the best value is halved
`refine_steps` times; the probe is then refit on train + validation with that C and scored on the test set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SOLVERS = ("torch", "sklearn")
METRICS = ("top1", "mean_per_class")
PAPER_C_GRID = tuple(10.0 ** (e / 2) for e in range(-12, 13))  # 1e-6 .. 1e6, half-decade steps
_SMALL_PROBLEM = 1 << 24  # N * D * K below which a CPU fit runs on one thread


@dataclasses.dataclass
class LinearClassifier:
    """Logits = features @ weight + bias."""

    weight: torch.Tensor  # (D, K)
    bias: torch.Tensor  # (K,)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        features = torch.as_tensor(features).to(self.weight.device, self.weight.dtype)
        return features @ self.weight + self.bias  # (N, K)

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).softmax(dim=-1)


@dataclasses.dataclass
class LinearProbeResult:
    top1: float  # test accuracy of the probe refit on train + validation
    mean_per_class: float  # test accuracy averaged over classes (equal weight per class)
    C: float  # the inverse regularisation strength used
    search: list[dict[str, float]]  # every C tried: {"C", "score", "loss"} on the validation split, in order
    classifier: LinearClassifier
    num_train: int
    num_test: int
    solver: str
    metric: str  # what the search maximised: "top1" or "mean_per_class"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the weights)."""
        return {
            "top1": self.top1,
            "mean_per_class": self.mean_per_class,
            "C": self.C,
            "metric": self.metric,
            "solver": self.solver,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "search": self.search,
        }


# --- inputs and metrics


def _as_features(value: Any, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    if tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def _as_targets(value: Any, count: int, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    if tensor.dim() != 1 or tensor.shape[0] != count:
        raise ValueError(f"{name} must be [N] class indices with N = {count}, got shape {tuple(tensor.shape)}")
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got {tensor.dtype}")
    if int(tensor.min()) < 0:
        raise ValueError(f"{name} must be class indices >= 0, got {int(tensor.min())}")
    return tensor.long()


def top1_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return (logits.argmax(dim=1).cpu() == targets.cpu()).double().mean().item()


def mean_per_class_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Recall of each class present in `targets`, averaged (balanced accuracy)."""
    hits = logits.argmax(dim=1).cpu() == targets.cpu()
    targets = targets.cpu()
    return float(np.mean([hits[targets == c].double().mean().item() for c in targets.unique().tolist()]))


_METRIC_FUNCTIONS = {"top1": top1_accuracy, "mean_per_class": mean_per_class_accuracy}


def stratified_split(targets: torch.Tensor, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): `val_fraction` of each class (at least one) held out.

    Every class keeps at least one training and one validation example, so each class needs two.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in targets.unique().tolist():
        members = (targets == c).nonzero().flatten()
        if len(members) < 2:
            raise ValueError(
                f"choosing C needs a validation split with every class in it, but class {c} has "
                f"{len(members)} training example(s): pass a fixed C to skip the search"
            )
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(max(1, round(val_fraction * len(members))), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


# --- solvers


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def _few_threads_if_small(work: int, device: torch.device) -> Iterator[None]:
    """One intra-op thread for small CPU problems: each L-BFGS step is a handful of tiny ops, so thread
    wake-ups dominate, and on a busy machine they stall (measured: up to 40x slower with 2 threads on
    the digits probe while other processes ran)."""
    if device.type != "cpu" or work > _SMALL_PROBLEM:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_torch(
    features: torch.Tensor,
    targets: torch.Tensor,
    C: float,
    num_classes: int,
    *,
    max_iter: int,
    tol: float,
    device: torch.device,
    init: LinearClassifier | None,
) -> LinearClassifier:
    # float64 on the CPU costs little and lets the solver converge as tightly as scipy's; a GPU gets
    # float32, where large feature sets live and where float64 is slow.
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    x = features.to(device, dtype)  # (N, D)
    y = targets.to(device)
    # Centred features: the same optimum (x W + b = (x - mean) W + (b + mean W), and the bias is not
    # penalised), but better conditioned, since CLIP features share a large common direction (unit
    # vectors in a narrow cone). Measured on a random tiny-ViT's digit features at C = 1e5: objective
    # 0.443 instead of 0.471 after 1,000 iterations (optimum 0.428).
    mean = x.mean(dim=0)  # (D,)
    x = x - mean
    if init is not None:
        weight = init.weight.detach().to(device, dtype).clone()
        bias = init.bias.detach().to(device, dtype) + mean @ weight
    else:
        weight = torch.zeros(x.shape[1], num_classes, device=device, dtype=dtype)  # (D, K)
        bias = torch.zeros(num_classes, device=device, dtype=dtype)  # (K,)
    weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
    one_hot = F.one_hot(y, num_classes).to(dtype)  # (N, K)
    scale, penalty = 1.0 / x.shape[0], 1.0 / (2.0 * C * x.shape[0])
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        history_size=10,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        # The gradient in closed form (softmax minus one-hot), written into .grad for L-BFGS: about
        # half the cost of autograd per step, which on small problems is most of the solver's time.
        logits = x @ weight + bias  # (N, K)
        log_z = logits.logsumexp(dim=1, keepdim=True)  # (N, 1)
        loss = scale * (log_z.sum() - (logits * one_hot).sum()) + penalty * weight.square().sum()
        residual = ((logits - log_z).exp() - one_hot) * scale  # (N, K) d loss / d logits
        torch.addmm(weight, x.T, residual, beta=2.0 * penalty, out=weight.grad)  # x^T r + W / (C N)
        torch.sum(residual, dim=0, out=bias.grad)
        return loss

    with _few_threads_if_small(x.numel() * num_classes, device):
        optimizer.step(closure)
    return LinearClassifier(weight.detach(), bias.detach() - mean @ weight.detach())


def _fit_sklearn(
    features: torch.Tensor, targets: torch.Tensor, C: float, num_classes: int, *, max_iter: int, tol: float
) -> LinearClassifier:
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as error:
        raise ValueError("solver='sklearn' needs scikit-learn (pip install scikit-learn)") from error

    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    x = features.double().cpu().numpy()
    y = targets.cpu().numpy()
    model = LogisticRegression(C=C, max_iter=max_iter, tol=tol)
    # One BLAS thread for small problems, for the reason given in _few_threads_if_small (measured here:
    # 0.5 s instead of 4.6 s for 1,000 iterations on the digits features while other processes ran).
    small = x.size * (int(y.max()) + 1) <= _SMALL_PROBLEM
    with warnings.catch_warnings(), threadpool_limits(1 if small else None):
        warnings.simplefilter("ignore", ConvergenceWarning)  # large C on separable data stops at max_iter
        model.fit(x, y)
    coef = torch.from_numpy(model.coef_)  # (K', D), K' = 1 for two classes
    intercept = torch.from_numpy(model.intercept_)
    if coef.shape[0] == 1:  # binary: one logit z for the second class; softmax([-z/2, z/2]) = sigmoid(z)
        coef = torch.cat([-coef / 2, coef / 2])
        intercept = torch.cat([-intercept / 2, intercept / 2])
    # Classes absent from this training set get a logit far below the others (never predicted).
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64)
    bias = torch.full((num_classes,), -1e4, dtype=torch.float64)
    columns = torch.as_tensor(model.classes_, dtype=torch.int64)
    weight[:, columns] = coef.T
    bias[columns] = intercept
    return LinearClassifier(weight, bias)


def fit_logistic_regression(
    features: Any,
    targets: Any,
    C: float,
    *,
    num_classes: int | None = None,
    solver: str = "torch",
    max_iter: int = 1000,
    tol: float | None = None,
    device: torch.device | str | None = None,
    init: LinearClassifier | None = None,
) -> LinearClassifier:
    """Multinomial logistic regression with L2 penalty 1/C on the weights (scikit-learn's objective).

    `init` warm-starts the PyTorch solver (the C search passes the neighbouring solution). `tol` is the
    gradient tolerance (largest gradient entry of the normalised objective): default 1e-6 for torch in
    float64 (CPU), 1e-5 in float32 (GPU), and scikit-learn's own 1e-4 for sklearn.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not (isinstance(C, (int, float)) and math.isfinite(C) and C > 0):
        raise ValueError(f"C must be a positive finite number, got {C!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    x = _as_features(features, "features")
    y = _as_targets(targets, x.shape[0], "targets")
    num_classes = _num_classes(num_classes, y)
    if solver == "sklearn":
        return _fit_sklearn(x, y, float(C), num_classes, max_iter=max_iter, tol=1e-4 if tol is None else tol)
    device = _default_device(device)
    if tol is None:
        tol = 1e-6 if device.type == "cpu" else 1e-5  # float32 gradients carry ~1e-7 relative noise
    return _fit_torch(x, y, float(C), num_classes, max_iter=max_iter, tol=tol, device=device, init=init)


def _num_classes(num_classes: int | None, *targets: torch.Tensor) -> int:
    needed = max(int(t.max()) for t in targets) + 1
    if num_classes is None:
        return needed
    if num_classes < needed:
        raise ValueError(f"num_classes={num_classes} but the targets hold class index {needed - 1}")
    return num_classes


# --- the C search and the probe


def _log_step(grid: Sequence[float]) -> float:
    logs = np.log10(sorted(grid))
    return float(np.min(np.diff(logs))) if len(logs) > 1 else 1.0


def search_C(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    num_classes: int,
    C_grid: Sequence[float] = PAPER_C_GRID,
    refine_steps: int = 2,
    metric: str = "top1",
    **fit_kwargs: Any,
) -> tuple[float, list[dict[str, float]], LinearClassifier]:
    """(best C, every trial {"C", "score", "loss"}, the classifier fitted at the best C on `train_x`).

    The validation score decides; ties go to the lower validation cross-entropy (small validation sets,
    as in few-shot, tie often). Grid values are fitted in increasing C, each warm-started from the last.
    """
    if not C_grid or any(not (math.isfinite(c) and c > 0) for c in C_grid):
        raise ValueError(f"C_grid must be non-empty positive finite values, got {list(C_grid)!r}")
    if refine_steps < 0:
        raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
    score_of = _METRIC_FUNCTIONS[metric]
    fitted: dict[float, LinearClassifier] = {}
    trials: list[dict[str, float]] = []

    def trial(C: float) -> None:
        nearest = min(fitted, key=lambda c: abs(math.log(c / C)), default=None)
        init = fitted[nearest] if nearest is not None and fit_kwargs.get("solver", "torch") == "torch" else None
        classifier = fit_logistic_regression(train_x, train_y, C, num_classes=num_classes, init=init, **fit_kwargs)
        fitted[C] = classifier
        logits = classifier.logits(val_x)
        loss = F.cross_entropy(logits, val_y.to(logits.device)).item()
        trials.append({"C": C, "score": score_of(logits, val_y), "loss": loss})

    def best() -> dict[str, float]:
        return max(trials, key=lambda t: (t["score"], -t["loss"]))

    for C in sorted(set(float(c) for c in C_grid)):
        trial(C)
    step = _log_step(C_grid)
    for _ in range(refine_steps):
        step /= 2
        centre = best()["C"]
        for C in (centre * 10.0**-step, centre * 10.0**step):
            if all(not math.isclose(C, c, rel_tol=1e-9) for c in fitted):
                trial(C)
    chosen = best()["C"]
    return chosen, trials, fitted[chosen]


@dataclasses.dataclass(frozen=True)
class LinearProbeConfig:
    """How `linear_probe` fits: a fixed C or the search for one, and the solver."""

    C: float | None = None  # None: search C on a validation split of the training set; a number fixes it
    C_grid: Sequence[float] = PAPER_C_GRID  # the values the search tries first
    refine_steps: int = 2  # halvings of the grid step around the best C
    val_fraction: float = 0.2  # share of each training class held out to choose C
    metric: str = "top1"  # what the search maximises: "top1" or "mean_per_class"
    solver: str = "torch"  # "torch" (L-BFGS in PyTorch) or "sklearn"
    max_iter: int = 1000  # L-BFGS iterations per fit
    tol: float | None = None  # gradient tolerance (default: see `fit_logistic_regression`)
    num_classes: int | None = None  # default: the largest class index in the targets, plus one
    seed: int = 0  # of the validation split
    device: torch.device | str | None = None  # where the torch solver runs (default: CUDA when available)

    @classmethod
    def of(cls, config: LinearProbeConfig | None, options: dict[str, Any]) -> LinearProbeConfig:
        """`config` (default: the defaults) with the fields named in `options` replaced."""
        return dataclasses.replace(config or cls(), **options)


def linear_probe(
    train_features: Any,
    train_targets: Any,
    test_features: Any,
    test_targets: Any,
    *,
    config: LinearProbeConfig | None = None,
    **options: Any,
) -> LinearProbeResult:
    """Fit a logistic-regression probe on frozen train features and score it on the test features.

    `config` says how (see LinearProbeConfig); keyword `options` replace its fields, so
    `linear_probe(..., C=1.0)` and `linear_probe(..., config=LinearProbeConfig(C=1.0))` are the same probe.
    C None searches C (see the module docstring) on a stratified `val_fraction` of the training set,
    maximising `metric` ("top1" or "mean_per_class"), then refits on all training data; a number fixes C.
    Features are used as given (pass L2-normalised features as `extract_image_features` returns them).
    """
    config = LinearProbeConfig.of(config, options)
    if config.metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {config.metric!r}")
    train_x = _as_features(train_features, "train_features")
    test_x = _as_features(test_features, "test_features")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_features and test_features must have the same width, got {train_x.shape[1]} and {test_x.shape[1]}"
        )
    train_y = _as_targets(train_targets, train_x.shape[0], "train_targets")
    test_y = _as_targets(test_targets, test_x.shape[0], "test_targets")
    num_classes = _num_classes(config.num_classes, train_y, test_y)
    missing = sorted(set(test_y.tolist()) - set(train_y.tolist()))
    if missing:
        raise ValueError(f"test classes {missing[:10]} have no training examples: the probe cannot predict them")
    C, search, init = _choose_C(train_x, train_y, num_classes, config)
    classifier = fit_logistic_regression(
        train_x,
        train_y,
        C,
        num_classes=num_classes,
        init=init if config.solver == "torch" else None,
        **_fit_options(config),
    )
    logits = classifier.logits(test_x)
    return LinearProbeResult(
        top1=top1_accuracy(logits, test_y),
        mean_per_class=mean_per_class_accuracy(logits, test_y),
        C=float(C),
        search=search,
        classifier=classifier,
        num_train=train_x.shape[0],
        num_test=test_x.shape[0],
        solver=config.solver,
        metric=config.metric,
    )


def _fit_options(config: LinearProbeConfig) -> dict[str, Any]:
    """The keyword arguments of `fit_logistic_regression` that `config` sets."""
    return {"solver": config.solver, "max_iter": config.max_iter, "tol": config.tol, "device": config.device}


def _choose_C(
    train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, config: LinearProbeConfig
) -> tuple[float, list[dict[str, float]], LinearClassifier | None]:
    """(C, the search's trials, the classifier fitted at C on the search's split to warm-start the refit):
    config.C as given, or searched on a stratified validation split."""
    if config.C is not None:
        return config.C, [], None
    fit_idx, val_idx = stratified_split(train_y, config.val_fraction, config.seed)
    return search_C(
        train_x[fit_idx],
        train_y[fit_idx],
        train_x[val_idx],
        train_y[val_idx],
        num_classes=num_classes,
        C_grid=config.C_grid,
        refine_steps=config.refine_steps,
        metric=config.metric,
        **_fit_options(config),
    )
