"""Attention Matching (Zweiger et al., arXiv 2602.16284): closed-form consolidation of a span of K/V.

For one span of keys K, values V (T x d) and reference queries Q (n x d), find t << T slots (k, v, beta)
such that for every reference query
  - the attention mass of the slots, sum_j exp(q.k_j*s + beta_j), matches the span's mass, and
  - the slots' softmax output matches the span's attention output,
so the slot tier can replace the span inside the log-sum-exp merge with the other tiers.

Keys are a subset of the span's keys (chosen by highest attention or by OMP on the mass), beta comes
from a non-negative least-squares fit of the mass (beta = log w), and values from a (ridge) least-squares
fit of the outputs. Every function works on a batch of independent problems (leading dim P) and solves
in fp32 whatever the model's dtype.

Masses are measured relative to each query's log-sum-exp over the whole context (`context_lse`), so a
query that barely attends to the span also weighs little in the fits: the error it would cause in the
merged output is proportional to the span's share of its attention.
"""

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

MIN_WEIGHT = 1e-6  # w below this is a dead slot (beta ~ -13.8)
VALUE_PRIORS = ("zero", "kept")  # what the value fit shrinks toward: 0, or the chosen entries' own values
QUERY_WEIGHTS = ("share", "peak")


@dataclass
class SpanProblem:
    """queries [P, n, d], keys/values [P, T, d], key_bias [P, T] (beta of keys that already are slots),
    context_lse [P, n] (log-sum-exp of each query over the whole context), scaling."""

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    key_bias: torch.Tensor
    context_lse: torch.Tensor
    scaling: float
    phi: torch.Tensor | None = None  # the weights, when the caller already has them

    def __post_init__(self):
        for name in ("queries", "keys", "values", "key_bias", "context_lse"):
            tensor = getattr(self, name).float()
            if not torch.isfinite(tensor).all() and name != "key_bias":
                raise ValueError(f"attention matching: non-finite values in `{name}`")
            setattr(self, name, tensor)

    def weights(self) -> torch.Tensor:
        """Phi [P, n, T]: each key's attention weight for each query, normalised over the whole context."""
        if self.phi is not None:
            return self.phi
        logits = self.queries @ self.keys.transpose(-1, -2) * self.scaling + self.key_bias[:, None, :]
        return torch.exp(logits - self.context_lse[:, :, None])

    def targets(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Span mass share m [P, n] and span-local attention output Y [P, n, d]."""
        mass = phi.sum(-1)
        output = (phi @ self.values) / mass.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
        return mass, output


def select_by_attention(phi: torch.Tensor, budget: int, order: float = 2) -> torch.Tensor:
    """Indices [P, t] of the keys with the highest RMS (`order=2`) or highest peak (`order=inf`) attention
    weight over the reference queries. The peak keeps a key that a few queries need sharply (a fact
    recalled once) even where keys that many queries attend a little have the larger RMS."""
    score = torch.linalg.vector_norm(phi, ord=order, dim=1)  # RMS up to the constant sqrt(n): same ranking
    return score.topk(budget, dim=-1).indices.sort(dim=-1).values


NNLS_METHODS = ("auto", "active-set", "fista", "fast")
# active-set rounds allowed per solve: from a warm start the exact support is usually a few exchanges away;
# past this many rounds the unfinished problems fall back to projected gradient, with a warning
NNLS_MAX_ROUNDS = 48


def nnls(
    gram: torch.Tensor, rhs: torch.Tensor, iterations: int = 400, initial: torch.Tensor | None = None,
    tolerance: float = 1e-6, method: str = "auto", max_rounds: int = NNLS_MAX_ROUNDS,
) -> torch.Tensor:
    """Batched non-negative least squares on the normal equations: argmin_{w>=0} ||A w - m||^2 given
    gram = A^T A [P, t, t] and rhs = A^T m [P, t].

    `method`:
    - "active-set": block principal pivoting in fp64 (`nnls_active_set`), exact, from the support of
      `initial` (default: every entry); problems it has not finished after `max_rounds` rounds go on by
      projected gradient from their best feasible point, with a warning;
    - "fista": batched accelerated projected gradient (`iterations` at most, stopped once the KKT residual
      is below `tolerance` times the largest |rhs|), then the same active set from its support to finish
      exactly (few rounds from there); one batched kernel per step, for accelerators;
    - "auto" (default): "active-set" on the CPU (measured several times faster than projected gradient
      there), "fista" elsewhere;
    - "fast": "active-set" on the CPU, projected gradient alone elsewhere (no exact finish: within ~1% of the
      optimum's objective; for work that repeats every few steps, e.g. online compaction, where the finish's
      host round trips halved a GPU stream's speed).
    """
    if method not in NNLS_METHODS:
        raise ValueError(f"nnls `method` must be one of {NNLS_METHODS}, got {method!r}")
    if method in ("auto", "fast"):
        if gram.device.type == "cpu":
            method = "active-set"
        elif method == "fast":
            return _projected_gradient(gram, rhs, iterations, initial, tolerance)
        else:
            method = "fista"
    if method == "fista":
        start = _projected_gradient(gram, rhs, iterations, initial, tolerance)
    else:
        start = torch.ones_like(rhs) if initial is None else initial.clamp(min=0)
    w, unsolved = nnls_active_set(gram, rhs, start, max_rounds)
    if bool(unsolved.any()):
        if method == "active-set":
            # the capped active set hands over to projected gradient, from where it stopped
            w[unsolved] = _projected_gradient(gram[unsolved], rhs[unsolved], iterations, w[unsolved], tolerance)
        scale = rhs.abs().amax(-1).clamp(min=1e-30)
        logger.warning(
            "NNLS: %d of %d problems (%d unknowns) not finished in %d active-set rounds; %s (KKT residual up to "
            "%.3g of max|rhs|)", int(unsolved.sum()), rhs.shape[0], rhs.shape[1], max_rounds,
            "projected gradient went on from there" if method == "active-set" else "they keep their best feasible point",
            float((_kkt_residual(gram, rhs, w) / scale)[unsolved].max()))
    return w


def _projected_gradient(gram, rhs, iterations, initial, tolerance) -> torch.Tensor:
    """FISTA with step 1/L, stopped early once every problem's KKT residual is below `tolerance` * max|rhs|."""
    # step 1/L with L the largest eigenvalue of the Gram matrix (power iteration)
    vector = torch.ones_like(rhs)
    for _ in range(30):
        vector = (gram @ vector[..., None])[..., 0]
        vector = vector / vector.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    lipschitz = ((gram @ vector[..., None])[..., 0] * vector).sum(-1).clamp(min=1e-30)[:, None] * 1.01
    w = initial.clone().clamp(min=0) if initial is not None else torch.zeros_like(rhs)
    y, momentum = w.clone(), 1.0
    scale = rhs.abs().amax(-1).clamp(min=1e-30)
    for iteration in range(1, iterations + 1):
        gradient = (gram @ y[..., None])[..., 0] - rhs
        w_next = (y - gradient / lipschitz).clamp(min=0)
        momentum_next = (1 + (1 + 4 * momentum * momentum) ** 0.5) / 2
        y = w_next + ((momentum - 1) / momentum_next) * (w_next - w)
        w, momentum = w_next, momentum_next
        if iteration % 25 == 0 and bool((_kkt_residual(gram, rhs, w) <= tolerance * scale).all()):
            break  # optimal up to `tolerance`: every problem of the batch meets the KKT conditions
    return w


def nnls_objective(gram: torch.Tensor, rhs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w^T G w / 2 - rhs^T w [P]: ||A w - m||^2 / 2 up to the constant ||m||^2 / 2."""
    return 0.5 * (w * (gram @ w[..., None])[..., 0]).sum(-1) - (rhs * w).sum(-1)


def nnls_active_set(
    gram: torch.Tensor, rhs: torch.Tensor, start: torch.Tensor | None = None, max_rounds: int = NNLS_MAX_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact NNLS by block principal pivoting (Kim and Park, 2011) in fp64, batched.

    The passive set starts as the support of `start` (a feasible point, e.g. projected gradient's answer;
    default: empty). Each round solves every unfinished problem's least squares on its passive set (one
    batched Cholesky); the answer is optimal when it is non-negative and the gradient off the set is too.
    Otherwise every violating entry changes sides; when that stops shrinking the number of violations
    (three rounds in a row), only the last one does (Murty's rule), which cannot cycle. Problems still
    unfinished after `max_rounds` rounds (or whose system could not be factorised) keep the better of
    `start` and their last answer made feasible. Returns (w [P, t], unsolved [P] bool)."""
    dtype = rhs.dtype
    gram, rhs = gram.double(), rhs.double()
    problems, size = rhs.shape
    eye = torch.eye(size, dtype=torch.bool, device=rhs.device)
    scale = torch.maximum(gram.diagonal(dim1=-2, dim2=-1).abs().amax(-1), rhs.abs().amax(-1)).clamp(min=1e-300)
    tolerance = (1e-12 * size * scale)[:, None]  # fp64 rounding of the gradient, relative to the problem
    ridge = 1e-13 * scale  # keeps systems with duplicate columns solvable; moves the objective by ~1e-13
    start = torch.zeros_like(rhs) if start is None else start.double().clamp(min=0)
    passive = start > 0
    w = start.clone()
    solved = torch.zeros(problems, dtype=torch.bool, device=rhs.device)
    stopped = torch.zeros_like(solved)  # a factorisation failed: the problem keeps its best feasible point
    fewest = torch.full((problems,), size + 1, device=rhs.device)
    chances = torch.full((problems,), 3, device=rhs.device)
    index = torch.arange(size, device=rhs.device)
    for _ in range(max_rounds):
        todo = (~solved & ~stopped).nonzero()[:, 0]
        if todo.numel() == 0:
            break
        g, r, f = gram[todo], rhs[todo], passive[todo]
        both = f[:, :, None] & f[:, None, :]
        # off the passive set: identity rows, so the batch stays square and those entries solve to 0
        system = torch.where(both, g + ridge[todo, None, None] * eye, eye.double())
        factor, info = torch.linalg.cholesky_ex(system)
        x = torch.where(f, torch.cholesky_solve(torch.where(f, r, 0.0)[..., None], factor)[..., 0], 0.0)
        failed = (info != 0) | ~torch.isfinite(x).all(-1)
        x = torch.where(failed[:, None], 0.0, x)
        gradient = torch.where(f, 0.0, (g @ x[..., None])[..., 0] - r)
        violating = (f & (x < 0)) | (~f & (gradient < -tolerance[todo]))
        count = violating.sum(-1)
        finished = (count == 0) & ~failed
        # exact where finished; elsewhere the answer made feasible stands in if no later round finishes
        w[todo] = torch.where(failed[:, None], w[todo], x.clamp(min=0))
        solved[todo] = finished
        stopped[todo] = failed
        # block exchange while it makes progress, then single exchanges of the last violating entry
        better = count < fewest[todo]
        fewest[todo] = torch.where(better, count, fewest[todo])
        left = torch.where(better, 3, chances[todo] - 1)
        chances[todo] = left
        last = torch.where(violating, index, -1).amax(-1).clamp(min=0)
        single = torch.nn.functional.one_hot(last, size).bool() & violating
        passive[todo] = f ^ torch.where((left > 0)[:, None], violating, single)
    unsolved = ~solved
    if bool(unsolved.any()):  # the better of `start` and the last answer made feasible
        keep_start = unsolved & (nnls_objective(gram, rhs, start) < nnls_objective(gram, rhs, w))
        w = torch.where(keep_start[:, None], start, w)
    if not torch.isfinite(w).all():
        raise FloatingPointError("attention matching: non-finite NNLS solution")
    return w.to(dtype), unsolved


def _kkt_residual(gram: torch.Tensor, rhs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """max_i |min(w_i, g_i)| with g the gradient: 0 exactly at the NNLS optimum (w >= 0, g >= 0, w.g = 0)."""
    gradient = (gram @ w[..., None])[..., 0] - rhs
    return torch.minimum(w, gradient).abs().amax(-1)


def fit_beta(
    phi_selected: torch.Tensor, mass: torch.Tensor, span_length: int, iterations: int = 400, nnls_method: str = "auto",
    min_weight: float = 0.0,
) -> torch.Tensor:
    """beta [P, t] = log w, w = least-squares fit of the span mass by the selected keys' weights, with
    w >= `min_weight` (0: plain NNLS, which leaves many slots at w = 0, i.e. dead).

    Bounded to [log 1e-6, log(10 * span_length)]: one slot can stand for at most the whole span."""
    gram = phi_selected.transpose(-1, -2) @ phi_selected
    rhs = (phi_selected.transpose(-1, -2) @ mass[..., None])[..., 0]
    # start from the single scale that matches the total mass
    scale = mass.sum(-1) / phi_selected.sum((-1, -2)).clamp(min=1e-30)
    initial = scale[:, None].expand_as(rhs).clone()
    if min_weight > 0:
        # w = floor + u with u >= 0: the same NNLS in u, its right-hand side moved by the floor's fit
        floor = torch.full_like(rhs, min_weight)
        rhs = rhs - (gram @ floor[..., None])[..., 0]
        initial = (initial - min_weight).clamp(min=0)
        w = floor + nnls(gram, rhs, iterations, initial=initial, method=nnls_method)
    else:
        w = nnls(gram, rhs, iterations, initial=initial, method=nnls_method)
    return torch.log(w.clamp(min=MIN_WEIGHT, max=10.0 * span_length))


def fit_values(
    phi_selected: torch.Tensor, beta: torch.Tensor, mass: torch.Tensor, output: torch.Tensor, ridge: float = 1e-3,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Values [P, t, d] minimising sum_i m_i^2 ||X_i C - Y_i||^2 + ridge * tr(X^T W X)/t * ||C - C0||^2,
    with X the slots' softmax weights (beta included) for each reference query and C0 the `prior` values
    (default 0): directions the queries do not determine stay at the prior."""
    scores = phi_selected * torch.exp(beta)[:, None, :]
    x = scores / scores.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    weight = mass[..., None]  # rows weighted by the span's share of the query's attention
    xw = x * weight
    gram = xw.transpose(-1, -2) @ xw
    t = gram.shape[-1]
    damping = ridge * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-12)
    gram = gram + damping[:, None, None] * torch.eye(t, device=gram.device)
    rhs = xw.transpose(-1, -2) @ (output * weight)
    if prior is not None:
        rhs = rhs + damping[:, None, None] * prior.float()
    if not (torch.isfinite(gram).all() and torch.isfinite(rhs).all()):
        raise FloatingPointError("attention matching: non-finite normal equations in the value fit")
    # the damped Gram matrix is symmetric positive definite: Cholesky (batched LU breaks on some CPU
    # builds for systems of a few hundred unknowns)
    factor, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):
        raise FloatingPointError("attention matching: the value fit's Gram matrix is not positive definite")
    values = torch.cholesky_solve(rhs, factor)
    if not torch.isfinite(values).all():
        raise FloatingPointError("attention matching: non-finite values from the least-squares fit")
    return values


def select_by_omp(
    phi: torch.Tensor, mass: torch.Tensor, budget: int, picks_per_step: int = 1, refit_every: int = 1, iterations: int = 100
) -> torch.Tensor:
    """Greedy orthogonal matching pursuit on the attention mass: repeatedly add the keys whose weights
    correlate most with the unexplained mass, refitting the non-negative weights every `refit_every`
    steps. `picks_per_step > 1` is the fast variant."""
    problems, _, total = phi.shape
    norms = phi.norm(dim=1).clamp(min=1e-30)  # [P, T]
    chosen = torch.zeros(problems, total, dtype=torch.bool, device=phi.device)
    residual = mass.clone()
    step = 0
    while int(chosen.sum(-1).min()) < budget:
        remaining = budget - int(chosen.sum(-1).min())
        correlation = (phi.transpose(-1, -2) @ residual[..., None])[..., 0] / norms
        correlation = correlation.masked_fill(chosen, float("-inf"))
        picks = correlation.topk(min(picks_per_step, remaining), dim=-1).indices
        chosen.scatter_(-1, picks, True)
        step += 1
        if step % refit_every == 0 or int(chosen.sum(-1).min()) >= budget:
            index = chosen.nonzero()[:, 1].view(problems, -1)
            selected = phi.gather(-1, index[:, None, :].expand(-1, phi.shape[1], -1))
            gram = selected.transpose(-1, -2) @ selected
            rhs = (selected.transpose(-1, -2) @ mass[..., None])[..., 0]
            w = nnls(gram, rhs, iterations)
            residual = mass - (selected @ w[..., None])[..., 0]
    return chosen.nonzero()[:, 1].view(problems, -1)


def attention_matching(
    problem: SpanProblem,
    budget: int,
    key_selection: str = "attention",
    fit_bias: bool = True,
    refit_values: bool = True,
    ridge: float = 1e-3,
    omp_picks_per_step: int | None = None,
    omp_refit_every: int = 4,
    nnls_iterations: int = 400,
    nnls_method: str = "auto",
    place=None,
    query_weights: str = "share",
    value_prior: str = "zero",
    bound_values: bool = False,
    min_beta: float | None = None,
    max_beta: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compact each problem's span to `budget` slots. Returns (indices [P, t] into the span, keys [P, t, d],
    values [P, t, d], beta [P, t]). `place(index, keys)`: where the chosen keys will be read from (e.g.
    moved to other RoPE positions); beta and values are then fitted to the moved keys, while the keys
    returned stay as chosen.

    `query_weights`: how much each reference query counts in the fits. "share": by the span's share of
    all the query reads (a query that barely looks at the span barely counts; the key ranking, the mass
    and the value rows are all measured against the whole context). "peak": every query counts as if the
    span were all it read: keys are ranked by their RMS softmax weight within the span, each query's mass
    row is scaled by its largest weight in the span (so queries that spread their attention over many
    keys, whose mass the dropped keys carry, weigh most in the beta fit) and the value rows are unweighted.
    With the same budget for every head, "peak" measured lower next-token KL (reports/am-reference-cpu/).
    `min_beta`: the lowest beta a fitted slot may get (the mass fit then solves w >= exp(min_beta) exactly);
    None: w >= 0, where the optimum switches many chosen keys off (beta at log 1e-6), so their slots serve
    no query and the value fit loses them. `max_beta`: the fitted betas are clipped to at most this (None:
    only the bound of `fit_beta`), so no slot stands for more than exp(max_beta) of its key: with few slots
    for a long span the mass fit gives single slots the weight of hundreds of entries, which queries
    unlike the reference ones then over-read."""
    total = problem.keys.shape[1]
    if budget <= 0:
        raise ValueError(f"attention matching needs a positive slot budget, got {budget}")
    if budget >= total:
        # nothing to compress: every key becomes a slot, exactly
        index = torch.arange(total, device=problem.keys.device).expand(problem.keys.shape[0], -1)
        return index, problem.keys, problem.values, problem.key_bias
    if query_weights not in QUERY_WEIGHTS:
        raise ValueError(f"query_weights must be one of {QUERY_WEIGHTS}, got {query_weights!r}")
    phi = problem.weights()
    mass, output = problem.targets(phi)
    tiny = torch.finfo(torch.float32).tiny
    ranked = phi if query_weights == "share" else phi / mass.clamp(min=tiny)[..., None]  # softmax within the span
    if isinstance(key_selection, torch.Tensor):  # indices [P, t] chosen by the caller
        index = key_selection
    elif key_selection == "attention":
        index = select_by_attention(ranked, budget)
    elif key_selection == "peak":
        index = select_by_attention(ranked, budget, order=float("inf"))
    elif key_selection == "omp":
        picks = omp_picks_per_step or max(1, budget // 32)
        index = select_by_omp(phi, mass, budget, picks, omp_refit_every if picks > 1 else 1)
    else:
        raise ValueError(f"key_selection must be 'attention', 'peak', 'omp' or an index tensor, got {key_selection!r}")
    gather = lambda t: t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
    keys, values = gather(problem.keys), gather(problem.values)
    phi_selected = phi.gather(-1, index[:, None, :].expand(-1, phi.shape[1], -1))
    prior_bias = problem.key_bias.gather(1, index)
    if place is not None:
        moved = place(index, keys).float()
        logits = problem.queries @ moved.transpose(-1, -2) * problem.scaling + prior_bias[:, None, :]
        phi_selected = torch.exp(logits - problem.context_lse[:, :, None])
    if query_weights == "peak":
        # each query's rows in units of its largest weight in the span (the scale cancels in beta)
        peak = phi.amax(-1).clamp(min=tiny)
        fit_phi, fit_mass, row_weight = phi_selected / peak[..., None], mass / peak, torch.ones_like(mass)
    else:
        fit_phi, fit_mass, row_weight = phi_selected, mass, mass
    if fit_bias:
        # phi already includes each key's prior bias; the fitted weight multiplies it
        min_weight = 0.0 if min_beta is None else math.exp(min_beta)
        fitted = fit_beta(fit_phi, fit_mass, total, nnls_iterations, nnls_method, min_weight)
        beta = prior_bias + (fitted if max_beta is None else fitted.clamp(max=max_beta))
    else:
        beta = prior_bias
    if value_prior not in VALUE_PRIORS:
        raise ValueError(f"`value_prior` must be one of {VALUE_PRIORS}, got {value_prior!r}")
    if refit_values:
        prior = values if value_prior == "kept" else None
        values = fit_values(phi_selected, beta - prior_bias, row_weight, output, ridge, prior=prior)
        if bound_values:
            values = bound_value_norms(values, problem.values, problem.key_bias)
    return index, keys, values, beta


def bound_value_norms(values: torch.Tensor, span_values: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """`values` [P, t, d] scaled down where longer than the longest value of the span's tokens (entries with
    no prior bias; every entry if there are none): an attention output is an average of values, so a slot
    that must stand for part of one never needs a longer value. Keeps slots that are folded into later
    compactions again and again from drifting away."""
    tokens = key_bias == 0
    norms = span_values.float().norm(dim=-1)
    longest = torch.where(tokens.any(-1), norms.masked_fill(~tokens, 0).amax(-1), norms.amax(-1))
    length = values.norm(dim=-1).clamp(min=torch.finfo(torch.float32).tiny)
    return values * (longest[:, None] / length).clamp(max=1.0)[..., None]
