"""Products with the total Hessian H = ∇²_λ F(λ*) and its surrogates (docs/method.md §3).

Every operator is a symmetric linear map on R^p with ``matvec(v) = H v`` (damping is added by the
solvers) and ``matvec_subset(v, tasks)``, an unbiased estimate from a subset of tasks (LiSSA).

kinds:
  exact         forward-over-reverse (jvp of the total gradient) through the unrolled inner loop.
  gauss-newton  (1/n) Σ J_iᵀ G_i J_i + μI,  J_i = dθ_i/dλ, G_i the Gauss–Newton matrix of L_Q^i at θ_i.
  gamma         (1/n) Σ J_iᵀ ∇²_θ L_Q^i J_i + Γ I + μI,  Γ = (1/n) Σ ‖∇_θ L_Q^i(θ_i)‖₁  (paper, Thm 5.1).
  fisher        (1/n) Σ |Q_i| E[ĝ_i ĝ_iᵀ] + μI, ĝ_i total gradients of the mean query loss with query
                labels sampled from the model (E[ĝ_i ĝ_iᵀ] is the Gauss–Newton term / |Q_i|); stored as a
                (n·M × p) factor so that its inverse is exact by Woodbury (linalg.woodbury).
  direct        (1/n) Σ ∇²_θ L_Q^i(θ_i) + μI: the Hessian of the direct-IF baseline (ignores dθ/dλ).
"""

from __future__ import annotations

import contextlib

import torch
from torch.func import grad, jvp, vjp, vmap

from ..allocator import memory_bytes
from ..errors import SettingsError
from ..linalg import FactorOperator
from ..progress import bar
from ..tasks.tensors import TaskTensors
from .objective import MetaProblem, TaskRecord

HESSIANS = ("exact", "gauss-newton", "gamma", "fisher", "direct")


# ---------------------------------------------------------------------- per-task building blocks
def jacobian_vp(problem: MetaProblem, lam, task: TaskRecord, theta, direction):
    """J_i · direction, J_i = dθ_i/dλ (unrolled: jvp through the inner loop; implicit: γ(∇²L_S+γI)^{-1})."""
    if problem.inner.kind == "unrolled":
        return jvp(lambda l: problem.adapt(l, task), (lam,), (direction,))[1]
    return problem.implicit_jacobian_t(theta, lam, task, direction)  # symmetric


def jacobian_t_vp(problem: MetaProblem, lam, task: TaskRecord, theta, vec):
    """J_iᵀ · vec."""
    if problem.inner.kind == "unrolled":
        return vjp(lambda l: problem.adapt(l, task), lam)[1](vec)[0]
    return problem.implicit_jacobian_t(theta, lam, task, vec)


def query_hvp_theta(problem: MetaProblem, theta, task: TaskRecord, direction):
    """∇²_θ L_Q(θ) · direction (the query loss Hessian in θ-space)."""
    g = lambda th: grad(problem.weighted_loss)(th, task.xq, task.yq, task.u)
    return jvp(g, (theta,), (direction,))[1]


def query_gnvp_theta(problem: MetaProblem, theta, task: TaskRecord, direction):
    """Gauss–Newton product J_fᵀ H_ℓ J_f · direction, f the network outputs on the query set.

    H_ℓ is the exact Hessian of the loss with respect to the outputs (PSD for cross-entropy and MSE)."""
    out_fn = lambda th: problem.forward(th, task.xq)
    out, d_out = jvp(out_fn, (theta,), (direction,))
    loss_of_out = lambda o: (task.u * problem.loss_fn(o, task.yq)).sum() / task.xq.shape[0]
    h_out = jvp(grad(loss_of_out), (out,), (d_out,))[1]
    return vjp(out_fn, theta)[1](h_out)[0]


# ---------------------------------------------------------------------- the operator
def check_hessian_kind(problem: MetaProblem, kind: str) -> None:
    """Refuse a Hessian kind the problem cannot provide (before any expensive work)."""
    if kind not in HESSIANS:
        raise SettingsError(f"unknown hessian {kind!r}; use one of {', '.join(HESSIANS)}")
    if kind == "exact" and problem.inner.kind != "unrolled":
        raise SettingsError("hessian 'exact' differentiates through the unrolled inner loop; with inner=implicit use gauss-newton, gamma or fisher")
    if kind == "exact" and problem.inner.first_order:
        raise SettingsError("hessian 'exact' needs second-order MAML; first-order training has no exact total Hessian — drop first_order or use gauss-newton")


class TotalHessian:
    """The total Hessian (or a surrogate) of F at λ over a task pool, as a linear operator."""

    def __init__(
        self,
        problem: MetaProblem,
        lam: torch.Tensor,
        tasks: TaskTensors,
        kind: str = "exact",
        *,
        fisher_samples: int = 1,
        seed: int = 0,
        w: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        u: torch.Tensor | None = None,
        column_chunk: int = 16,
        product_dtype: torch.dtype | None = None,
    ):
        check_hessian_kind(problem, kind)
        self.problem = problem
        self.lam = lam.detach()
        self.tasks = tasks
        self.kind = kind
        # task / support / query weights of the objective (docs/method.md §1): zeros give the Hessian of a reduced pool
        self.w, self.v, self.u = w, v, u
        self.dim = lam.numel()
        self.dtype = lam.dtype
        self.device = lam.device
        self.n_tasks = len(tasks)
        self.n_total = problem.collective.total_count(len(tasks))
        self.fisher_samples, self.seed = fisher_samples, seed
        self.column_chunk = column_chunk
        # products may run in a lower precision (float32: ≈2.5× cheaper on CPU) while every sum over
        # tasks and the solver's vectors stay in λ's dtype; the solve's residual is then re-measured
        # with working-precision products (influence/task_if.py) so the reported number stays true
        self.product_dtype = product_dtype or lam.dtype
        self._plam = self.lam.to(self.product_dtype)
        self._ptasks = tasks if self.product_dtype == lam.dtype else tasks.to(dtype=self.product_dtype)
        self._pweights = tuple(None if t is None else t.to(self.product_dtype) for t in (w, v, u))
        self.n_matvecs = 0
        self.gamma = 0.0
        self._factor: torch.Tensor | None = None  # fisher: H = factorᵀfactor + shift·I (Woodbury), drawn on first use
        self._fisher_op: FactorOperator | None = None
        self.shift = problem.weight_decay
        # θ_i(λ*) is fixed: adapt once (the implicit inner solve is the expensive part of its products)
        self.thetas = None
        if kind in ("gauss-newton", "gamma", "direct"):
            self.thetas = problem.per_task(lambda l, t: problem.adapt(l, t).detach(), self._plam, self._ptasks, *self._pweights[1:],
                                           desc=f"{kind} Hessian: adapted θ_i")
        if kind == "gamma":
            l1 = problem.sum_over_tasks(self._query_grad_l1, self._plam, self._ptasks, *self._pweights, extra=(self.thetas,), accumulate=self.dtype,
                                        desc="gamma Hessian: Γ")
            self.gamma = float(l1) / self.n_total
        if kind == "fisher" and self.product_dtype != self.dtype:
            raise SettingsError("the fisher Hessian is an exact factor, not products: drop the float32 product precision")
        if kind == "fisher" and fisher_samples < 1:
            raise SettingsError(f"fisher_samples must be ≥ 1, got {fisher_samples}")

    @property
    def factor(self) -> torch.Tensor | None:
        """fisher: the rows G of H = GᵀG + μI, drawn on first use (a reweighted pool draws them with its
        weights: a support removal changes J_i) or adopted from a curvature file of this very operator."""
        if self.kind != "fisher":
            return None
        if self._factor is None:
            self._factor = fisher_factor(self.problem, self.lam, self.tasks, self.fisher_samples, self.seed, self.w, self.v, self.u)
        return self._factor

    def adopt_factor(self, rows: torch.Tensor) -> None:
        """Use ``rows`` as this fisher operator's factor instead of drawing it again: only for rows drawn for
        the same λ, pool, weights, draws and seed (a curvature file whose fingerprint is this operator's)."""
        if self.kind != "fisher":
            raise SettingsError(f"only a fisher Hessian has a factor to adopt, not {self.kind!r}")
        self._factor, self._fisher_op = rows.to(self.lam), None

    @property
    def _fisher(self) -> FactorOperator:
        if self._fisher_op is None:
            self._fisher_op = FactorOperator(self.factor, self.shift)
        return self._fisher_op

    # per-task products, vmapped by MetaProblem.sum_over_tasks
    def task_gammas(self) -> torch.Tensor:
        """w_i ‖∇_θ L_Q^i(θ_i)‖₁ of this process's tasks (gamma kind): task i's share of n·Γ, e.g. to downdate Γ by a removed task."""
        if self.kind != "gamma":
            raise SettingsError(f"per-task Γ shares belong to the gamma Hessian, not {self.kind!r}")
        if getattr(self, "_task_gammas", None) is None:
            w = self._pweights[0]
            l1 = self.problem.per_task(self._query_grad_l1, self._plam, self._ptasks, *self._pweights[1:], extra=(self.thetas,)).to(self.dtype)
            self._task_gammas = l1 if w is None else l1 * w.to(self.dtype)
        return self._task_gammas

    def _query_grad_l1(self, lam, task: TaskRecord, theta):
        return grad(self.problem.weighted_loss)(theta, task.xq, task.yq, task.u).abs().sum()

    def _task_product(self, direction):
        p = self.problem
        kind = self.kind

        def exact(lam, task):
            return p.task_total_hvp(lam, task, direction)

        def sandwich(lam, task, theta):
            jd = jacobian_vp(p, lam, task, theta, direction)
            inner = query_gnvp_theta if kind == "gauss-newton" else query_hvp_theta
            return jacobian_t_vp(p, lam, task, theta, inner(p, theta, task, jd))

        def direct(lam, task, theta):
            return query_hvp_theta(p, theta, task, direction)

        return {"exact": exact, "gauss-newton": sandwich, "gamma": sandwich, "direct": direct}[kind]

    def _local_sum(self, v: torch.Tensor, index=None) -> torch.Tensor:
        """Σ_i w_i (H_i v) over this process's tasks (or the subset ``index``), in λ's dtype."""
        pick = (lambda t: t) if index is None else (lambda t: None if t is None else t[index])
        tasks = self._ptasks if index is None else self._ptasks.subset(index)
        extra = () if self.thetas is None else (pick(self.thetas),)
        w, v_, u = (pick(t) for t in self._pweights)
        return self.problem.sum_over_tasks(self._task_product(v.to(self.product_dtype)), self._plam, tasks, w, v_, u,
                                           extra=extra, reduce=False, accumulate=self.dtype)

    def tasks_matvec(self, v: torch.Tensor, task_index) -> torch.Tensor:
        """Σ_{i ∈ task_index} w_i H_i v over this process's tasks ``task_index`` (no 1/n, no μ, no Γ):
        the tasks' own share of n·H, e.g. to downdate H by a removed task."""
        if self.kind == "fisher":
            raise SettingsError("the fisher Hessian is a factor: downdate its rows instead of taking per-task products")
        index = torch.as_tensor(task_index, dtype=torch.long)
        return self._local_sum(v.to(self.lam), index).detach()

    def agree(self, flag: bool) -> bool:
        """Any process's ``flag``: a solver's time limit, decided alike on every process of a sharded pool (linalg/cg.py)."""
        return self.problem.collective.any_true(flag)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += 1
        v = v.to(self.lam)
        if self.kind == "fisher":
            return self._fisher.matvec(v)
        out = self.problem.collective.all_sum(self._local_sum(v)) / self.n_total + (self.gamma + self.problem.weight_decay) * v
        return out.detach()

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """H V for the columns of V (p, m), vectorised over the directions; returns (p, m)."""
        self.n_matvecs += V.shape[1]
        V = V.to(self.lam)
        if self.kind == "fisher":
            return self._fisher.matmat(V)
        # directions are vmapped ``column_chunk`` at a time (and tasks by the problem's chunk_size), so
        # memory is bounded by one chunk of each, whatever the number of right-hand sides
        step = self.column_chunk or V.shape[1]
        with self._tasks_per_chunk_for(min(step, V.shape[1])):
            local = torch.cat([vmap(self._local_sum, in_dims=1, out_dims=1)(V[:, c:c + step]) for c in range(0, V.shape[1], step)], dim=1)
        out = self.problem.collective.all_sum(local) / self.n_total + (self.gamma + self.problem.weight_decay) * V
        return out.detach()

    @contextlib.contextmanager
    def _tasks_per_chunk_for(self, columns: int):
        """Each vmapped direction multiplies a task chunk's memory: a block of ``columns`` takes 1/columns of a set
        chunk size, or as many tasks as the memory budget holds ``columns`` times over (a small pool: all at once), so
        that it fits the memory of one product's chunk (unbounded, 16 Conv4 directions over 100-task chunks spent
        their time allocating and ran slower per direction than single products: benchmarks/bench_block_products.py)."""
        problem, saved = self.problem, self.problem.chunk_size
        if columns > 1:
            problem.chunk_size = max(1, saved // columns) if saved else problem.auto_chunk(self._plam, self._ptasks, columns)
        try:
            yield
        finally:
            problem.chunk_size = saved

    def matvec_subset(self, v: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        """Unbiased estimate of H v from the tasks ``task_index`` (local indices)."""
        self.n_matvecs += 1
        v = v.to(self.lam)
        if self.kind == "fisher":
            raise SettingsError("lissa samples tasks; the fisher Hessian is solved exactly by woodbury — use --solver woodbury or cg")
        # A local (not all-reduced) estimate: LiSSA's subsets are drawn per process.
        part = self._local_sum(v, task_index)
        return (part / len(task_index) + (self.gamma + self.problem.weight_decay) * v).detach()


def fisher_factor(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, samples: int, seed: int,
                  w: torch.Tensor | None = None, v: torch.Tensor | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
    """Rows √(w_i |Q_i| / (n·M)) ĝ_{i,m}: total gradients of the task's mean query loss with query
    labels drawn from the adapted model, M draws per task.

    For cross-entropy labels are drawn from softmax(f); for MSE from N(f, 1/2), the Gaussian whose
    negative log-likelihood is the squared error. The per-example gradients of sampled labels have
    mean zero, so E[ĝ_i ĝ_iᵀ] is task i's Gauss–Newton term divided by |Q_i|: the √|Q_i| restores
    the scale (docs/method.md §3). With weights (w, v, u) the rows are those of the reduced objective: ĝ taken
    with the example weights, each task's rows scaled by √w_i."""
    return _fisher(problem, lam, tasks, samples, seed, w, v, u, with_gradients=False)[0]


def fisher_factor_and_gradients(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, samples: int,
                                seed: int) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """(:func:`fisher_factor`, the per-task total gradients g_i of this process's tasks, the share of those tasks whose
    draws all equal their own labels): through the unrolled inner loop one pass gives each g_i and the outputs the
    labels are drawn from; a task whose draws all equal its labels has rows equal to g_i, the others one more forward
    pulled back once per draw. The same rows as :func:`fisher_factor` and the same g_i as ``problem.total_gradients``
    (benchmarks/bench_fit_gradients.py times it against the two passes). Implicit inner loops make the two passes
    (share None)."""
    return _fisher(problem, lam, tasks, samples, seed, None, None, None, with_gradients=True)


def _fisher(problem, lam, tasks, samples, seed, w, v, u, with_gradients: bool):
    if samples < 1:
        raise SettingsError(f"fisher_samples must be ≥ 1, got {samples}")
    _check_factor_fits(problem, lam, tasks, samples, with_gradients)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    fused = with_gradients and problem.inner.kind == "unrolled"
    gradients = share = None
    if fused:
        # the outputs the labels are drawn from come out of the gradient pass's own forward
        gradients, out = _gradients_and_outputs(problem, lam.detach(), tasks)
    else:
        with torch.no_grad():
            out = torch.cat([o for _, o in _task_chunks(problem, problem.query_outputs, lam, tasks, v, u, (), "fisher fit: query outputs")])
    # labels are drawn for the whole pool (gathered over shards), so every process draws what one process would
    out = problem.collective.gather_rows(out)
    draws = [problem.collective.local_rows(sample_labels(problem, out, gen).to(tasks.query_y.device), len(tasks)) for _ in range(samples)]
    if fused:
        per_draw, share = _rows_of_draws(problem, lam.detach(), tasks, torch.stack(draws, 1), gradients)
        rows = [problem.collective.gather_rows(r) for r in per_draw]
    else:
        rows = []
        for yq in draws:
            sampled = TaskTensors(tasks.support_x, tasks.support_y, tasks.query_x, yq)
            rows.append(problem.collective.gather_rows(_total_gradients(problem, lam, sampled, v, u, "fisher fit: rows")))  # every process holds all rows (Woodbury)
        if with_gradients:
            gradients = _total_gradients(problem, lam, tasks, None, None, "fisher fit: task gradients")
    G = torch.cat(rows) * (tasks.n_query / (problem.collective.total_count(len(tasks)) * samples)) ** 0.5
    if w is not None:
        task_weight = problem.collective.gather_rows(w.to(G)).clamp_min(0).sqrt()
        G = G * task_weight.repeat(samples)[:, None]
    return G, gradients, share


def _check_factor_fits(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, samples: int, with_gradients: bool) -> None:
    """Refuse, before its pass, a factor (every process holds all n·M rows, plus the kept g_i) larger than the
    machine: the pass would run for its minutes and then die out of memory."""
    n, p = problem.collective.total_count(len(tasks)), lam.numel()
    need = (n * samples + (len(tasks) if with_gradients else 0)) * p * lam.element_size()
    have = memory_bytes(lam.device)
    if have is not None and need > 0.8 * have:
        raise SettingsError(
            f"the fisher factor of {n:,} tasks × {samples} draws × {p:,} parameters takes {need / 2**30:.1f} GiB in {str(lam.dtype).replace('torch.', '')}"
            f"{' with the kept task gradients' if with_gradients else ''}, more than this machine's {have / 2**30:.1f} GiB allows: use fewer draws "
            "(--fisher-samples 1), or a curvature fitted on a task subsample (`metainfluence curvature --method nystrom --hessian gauss-newton "
            "--max-tasks M`, or --method ekfac), or a smaller pool")


def _task_chunks(problem: MetaProblem, fn, lam: torch.Tensor, tasks: TaskTensors, v, u, extra: tuple, desc: str):
    """``problem._mapped_chunks`` under a bar counting tasks (a heartbeat line a minute with --no-progress: a pass
    over a large Conv4 pool runs for minutes), updated once per chunk so the per-task work is untouched."""
    with bar(desc, len(tasks), "task") as progress:
        for c, out in problem._mapped_chunks(fn, lam, tasks, v, u, extra):
            progress.update(c.stop - c.start)
            yield c, out


def _total_gradients(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, v, u, desc: str) -> torch.Tensor:
    """``problem.total_gradients`` (the same per-chunk calls), its bar counting tasks."""
    return torch.cat([g for _, g in _task_chunks(problem, problem.task_total_gradient, lam.detach(), tasks, v, u, (), desc)]).detach()


def _query_loss_in_outputs(problem: MetaProblem, task: TaskRecord, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∂L_Q/∂outputs for labels y: the query loss of ``problem.weighted_loss``, differentiated in the outputs."""
    return grad(lambda o: (task.u * problem.loss_fn(o, y)).sum() / task.xq.shape[0])(out)


def _gradients_and_outputs(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_i (n, p), the adapted query outputs (n, |Q|, …)) in one pass: each task's forward through its adaptation,
    pulled back for its own labels, with the outputs kept to draw the fisher labels from (no separate no-grad
    forward over the pool for them)."""

    def one(lam, task: TaskRecord):
        out, pullback = vjp(lambda l: problem.query_outputs(l, task), lam)
        return pullback(_query_loss_in_outputs(problem, task, out, task.yq))[0], out

    parts = [(g.detach(), out.detach()) for _, (g, out) in _task_chunks(problem, one, lam, tasks, None, None, (), "fisher fit: task gradients + outputs")]
    return torch.cat([g for g, _ in parts]), torch.cat([out for _, out in parts])


def _rows_of_draws(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, labels: torch.Tensor, gradients: torch.Tensor):
    """([total gradients under label set m (n, p) for each m], the share of tasks whose draws all equal their labels)
    for ``labels`` (n, M, |Q|, …), given the tasks' own gradients. A task whose every draw equals its labels has
    rows equal to g_i (on a clean pool fitted to ~100% training accuracy most of them); the others make one vjp of
    the query outputs each, pulled back once per draw."""

    def one(lam, task: TaskRecord, draws):
        out, pullback = vjp(lambda l: problem.query_outputs(l, task), lam)
        return torch.stack([pullback(_query_loss_in_outputs(problem, task, out, draws[m]))[0] for m in range(draws.shape[0])])

    n, draws = len(tasks), labels.shape[1]
    own_labels = tasks.query_y.to(labels.device)[:, None].expand_as(labels)
    other = (labels != own_labels).reshape(n, -1).any(1).cpu().nonzero().flatten().tolist()
    if not other:  # every row is a gradient: no copy (the caller concatenates and scales them)
        return [gradients] * draws, 1.0
    drawn = gradients[:, None].expand(n, draws, -1).clone()
    for c, r in _task_chunks(problem, one, lam, tasks.subset(other), None, None, (labels[other],), "fisher fit: rows (draws ≠ labels)"):
        drawn[other[c.start:c.stop]] = r.detach()
    return [drawn[:, m] for m in range(draws)], (n - len(other)) / n


def gauss_newton_factor(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, max_gb: float = 8.0) -> torch.Tensor:
    """Rows √(p_{iqc} |Q_i| / n) g_{iqc}, one per task i, query example q and class c, where g_{iqc} is
    the total gradient of task i's query loss with only example q weighted and labelled c: for
    softmax cross-entropy Σ_c p_c (p − e_c)(p − e_c)ᵀ = diag(p) − ppᵀ is the loss's Hessian in the
    logits, so GᵀG is the total Gauss–Newton matrix (1/n) Σ_i (1/|Q_i|) Σ_q J_qᵀ(diag p − ppᵀ)J_q
    exactly — the expectation the fisher factor samples. n·|Q|·C total-gradient passes' worth of
    rows, refused above ``max_gb`` of memory."""
    if problem.loss_name != "cross_entropy":
        raise SettingsError(f"the exact Gauss–Newton factor enumerates the classes of a softmax cross-entropy; loss {problem.loss_name!r} "
                            "is not one — use --method fisher or nystrom")

    with torch.no_grad():
        probs = torch.softmax(problem.per_task(problem.query_outputs, lam, tasks).double(), -1)  # (n_local, |Q|, C)
    n_local, n_q, n_c = probs.shape
    n = problem.collective.total_count(n_local)
    need = n * n_q * n_c * lam.numel() * lam.element_size() / 2**30
    if need > max_gb:
        raise SettingsError(f"the exact Gauss–Newton factor would hold {n * n_q * n_c} rows × {lam.numel()} parameters = {need:.1f} GB; "
                            "use --method fisher (sampled rows) or nystrom, or fewer tasks (--max-tasks)")
    # one total-gradient pass per (query example, class); one forward with |Q|·C vmapped pullbacks gives the
    # same rows but was 2× slower on CPU in a one-off timing (Conv4-16, 100 tasks, float32; script not kept)
    rows = []
    with bar("gn-factor rows", n_q * n_c, "pass") as progress:  # n_q·n_c passes over the pool: a heartbeat line a minute without bars
        for q in range(n_q):
            u = torch.zeros(n_local, n_q, dtype=lam.dtype, device=lam.device)
            u[:, q] = 1.0
            for c in range(n_c):
                yq = tasks.query_y.clone()
                yq[:, q] = c
                labelled = TaskTensors(tasks.support_x, tasks.support_y, tasks.query_x, yq)
                g = problem.total_gradients(lam, labelled, None, u)  # (1/|Q|) J_qᵀ(p_q − e_c): weighted_loss divides by |Q|
                scale = (probs[:, q, c] * n_q / n).sqrt().to(g)  # √(p/(n|Q|)) J_qᵀ(p_q − e_c) = √(p|Q|/n) g
                rows.append(problem.collective.gather_rows(g * scale[:, None]))
                progress.update(1)
    return torch.cat(rows)


def sample_labels(problem: MetaProblem, out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution at outputs ``out`` (any leading shape):
    a class from softmax(out) for cross-entropy, out + N(0, 1/2) for MSE (the Gaussian whose negative
    log-likelihood is the squared error). Gradients of such labels give the Fisher = Gauss–Newton term."""
    if problem.loss_name == "cross_entropy":
        probs = torch.softmax(out.double(), -1).cpu()
        flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).reshape(probs.shape[:-1])
        return flat.to(out.device)
    if problem.loss_name == "mse":
        noise = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
        return out + noise * 0.5**0.5
    raise SettingsError(f"the fisher Hessian needs a likelihood to sample from; loss {problem.loss_name!r} has none — use gauss-newton")
