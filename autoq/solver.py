"""Exact format assignment under a bits budget: a multiple-choice knapsack solved as an ILP.

Given per-group, per-format scores and storage bits, pick one format per group minimising the
total score subject to ``sum(bits) <= budget * sum(params)`` over the searched layers. Groups
are layers a runtime fuses (they must share a format): linears that read the same tensor, plus
the search space's regex rules. Solved by HiGHS through ``scipy.optimize.milp`` with a zero
optimality gap, so results are exact (tests compare against brute force).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import Bounds, LinearConstraint, milp

from autoq.errors import AutoqError
from autoq.search_space import SearchSpace


def assign_groups(table: pd.DataFrame, space: SearchSpace) -> pd.DataFrame:
    """Add a ``group`` column: layers that must share a format get the same group name."""
    layers = table.drop_duplicates("layer")[["layer", "shared_input"]]
    parent = {name: name for name in layers.layer}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def union(a: str, b: str) -> None:
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)

    first_by_rule: dict[str, str] = {}
    for name, shared in zip(layers.layer, layers.shared_input):
        if space.group_by_shared_input and shared in parent:
            union(name, shared)
        key = space.group_rule_key(name)
        if key is not None:
            union(name, first_by_rule.setdefault(key, name))
    members: dict[str, list[str]] = {}
    for name in layers.layer:
        members.setdefault(find(name), []).append(name)
    group_name = {m: _group_label(names) for names in members.values() for m in names}
    return table.assign(group=table.layer.map(group_name))


def _group_label(names: list[str]) -> str:
    """``model.layers.0.self_attn.{q_proj,k_proj,v_proj}`` for a group, the name for a single layer."""
    if len(names) == 1:
        return names[0]
    prefix = names[0].rsplit(".", 1)[0] + "."
    if all(n.startswith(prefix) and "." not in n[len(prefix) :] for n in names):
        return prefix + "{" + ",".join(n[len(prefix) :] for n in names) + "}"
    return "{" + ",".join(names) + "}"


@dataclass(frozen=True)
class Options:
    """Per-group aggregated candidates: ``scores[g][k]`` and ``bits[g][k]`` for ``formats[g][k]``."""

    groups: list[str]
    formats: list[list[str]]
    scores: list[np.ndarray]
    bits: list[np.ndarray]
    params: int

    @classmethod
    def from_table(cls, table: pd.DataFrame) -> Options:
        """Aggregate a grouped score table; a group's candidates are the formats all members allow."""
        if "group" not in table:
            raise ValueError("score table needs a 'group' column (see assign_groups)")
        members = table.groupby("group", sort=True).layer.nunique()
        per_format = table.groupby(["group", "format"], sort=True).agg(
            score=("score", "sum"), bits=("bits", "sum"), layers=("layer", "nunique")
        )
        per_format = per_format[per_format.layers == members.reindex(per_format.index.get_level_values(0)).values]
        groups, formats, scores, bits = [], [], [], []
        for group in members.index:
            if group not in per_format.index.get_level_values(0):
                raise AutoqError(f"layers of group {group} have no format in common")
            rows = per_format.loc[group]
            groups.append(group)
            formats.append(list(rows.index))
            scores.append(rows.score.to_numpy(dtype=float))
            bits.append(rows.bits.to_numpy(dtype=float))
        params = int(table.drop_duplicates("layer").params.sum())
        return cls(groups, formats, scores, bits, params)

    def min_bits(self) -> float:
        return sum(b.min() for b in self.bits) / self.params

    def max_bits(self) -> float:
        return sum(b.max() for b in self.bits) / self.params


@dataclass(frozen=True)
class Solution:
    budget_bits: float
    achieved_bits: float
    total_score: float
    choice: dict[str, str]  # group -> format


def solve(options: Options, budget_bits: float) -> Solution:
    """Minimum-total-score assignment with average bits per searched weight <= ``budget_bits``."""
    minimum = options.min_bits()
    if budget_bits < minimum - 1e-12:
        raise AutoqError(f"--bits {budget_bits:g} is infeasible: the cheapest assignment needs {minimum:.4f} bits")
    sizes = [len(f) for f in options.formats]
    n = sum(sizes)
    scores = np.concatenate(options.scores)
    bits = np.concatenate(options.bits)
    # Scale both to O(1) so HiGHS tolerances mean the same thing for a 1 MB and a 1 TB model.
    score_scale = max(scores.max(), 1e-300)
    pick_one = np.zeros((len(sizes), n))
    start = 0
    for row, size in enumerate(sizes):
        pick_one[row, start : start + size] = 1
        start += size
    capacity = budget_bits * options.params
    margin = 0.0
    for _ in range(20):  # tighten by the solver's feasibility tolerance if it overshoots
        with _native_output_silenced():
            result = milp(
                c=scores / score_scale,
                integrality=np.ones(n),
                bounds=Bounds(0, 1),
                constraints=[
                    LinearConstraint(pick_one, 1, 1),
                    LinearConstraint(bits[None, :] / options.params, -np.inf, (capacity - margin) / options.params),
                ],
                options={"mip_rel_gap": 0.0, "presolve": True},
            )
        if result.x is None:
            raise AutoqError(f"the solver found no assignment for --bits {budget_bits:g} ({result.message})")
        picked = np.round(result.x).astype(bool)
        used = float(bits[picked].sum())
        if used <= capacity:
            break
        margin += used - capacity + 1.0
    else:
        raise AutoqError(f"the solver could not meet --bits {budget_bits:g} exactly")
    choice, start = {}, 0
    for group, formats, size in zip(options.groups, options.formats, sizes):
        choice[group] = formats[int(np.argmax(picked[start : start + size]))]
        start += size
    return Solution(budget_bits, used / options.params, float(scores[picked].sum()), choice)


def frontier(options: Options, budgets: list[float]) -> pd.DataFrame:
    """One solve per budget from the same scores: the accuracy-proxy / size trade-off curve."""
    rows = []
    for budget in sorted(budgets):
        solution = solve(options, budget)
        counts = pd.Series(solution.choice).value_counts()
        rows.append({
            "budget_bits": budget, "achieved_bits": solution.achieved_bits, "total_score": solution.total_score,
            **{f"groups_{fmt}": int(count) for fmt, count in counts.items()},
        })  # fmt: skip
    return pd.DataFrame(rows).fillna(0)


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """File descriptor 1 points at /dev/null inside the block: HiGHS' MIP solver prints debugging
    lines (``HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();``) from C++
    straight to the process's stdout, past ``sys.stdout`` and scipy's ``disp=False``."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
