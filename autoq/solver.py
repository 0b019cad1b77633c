"""Exact format assignment under a bits budget: a multiple-choice knapsack solved as an ILP.

Given per-group, per-format scores and storage bits, pick one format per group minimising the
total score subject to ``sum(bits) <= budget * sum(params)`` over the searched layers. Groups
are layers a runtime fuses (they must share a format): linears that read the same tensor, plus
the search space's regex rules. Solved exactly by ``_MultipleChoiceKnapsack`` (dominance, LP bounds,
dynamic programming over Pareto fronts), in float64 without solver tolerances: tests compare it
against brute force, including scores that span ten orders of magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

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
    capacity = max(budget_bits * options.params, sum(b.min() for b in options.bits))  # min_bits within rounding
    picks = _MultipleChoiceKnapsack(options.scores, options.bits).solve(capacity)
    choice = {group: formats[k] for group, formats, k in zip(options.groups, options.formats, picks)}
    used = sum(float(b[k]) for b, k in zip(options.bits, picks))
    score = math.fsum(float(s[k]) for s, k in zip(options.scores, picks))
    return Solution(budget_bits, used / options.params, score, choice)


# Pruning keeps only states that could beat the incumbent by more than this (relative): results are
# optimal to ~1e-13 of the total score, float64 rounding of the sums being ~1e-16.
_PRUNE_RELATIVE = 1e-13


class _MultipleChoiceKnapsack:
    """Exact minimum of ``sum(score)`` over one item per group with ``sum(bits) <= capacity``.

    A generic MILP solver decides with absolute tolerances (HiGHS: 1e-6 gap, 1e-7 feasibility),
    which cannot tell apart scores that span ten orders of magnitude, as layer sensitivities do.
    This problem has a structure that allows an exact method in plain float64 arithmetic:

    1. Per group, items that cost more bits for no lower score are dropped (they are never needed).
    2. The LP relaxation is solved greedily on each group's lower convex hull (Dyer/Zemel); its
       rounded-down solution, topped up greedily, is the incumbent. A Lagrangian reduction at the LP
       multiplier drops every item whose bound (LP value + reduced cost) cannot beat the incumbent.
    3. Dynamic programming over the groups keeps, per step, the Pareto front of (bits, score) partial
       assignments (a partial state with no fewer bits and no lower score can never do better), and
       drops states whose lower bound (score so far + LP of the remaining groups) cannot beat the
       incumbent. What remains at the end contains the optimum, or the incumbent is optimal.

    Every bound is a sum of non-negative terms computed in float64, so nothing is lost to
    cancellation however small the optimum is next to the largest score.
    """

    def __init__(self, scores: list[np.ndarray], bits: list[np.ndarray]):
        self.kept: list[np.ndarray] = []  # original item indices per group, bits ascending, score descending
        self.bits: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        for group_scores, group_bits in zip(scores, bits):
            group_scores, group_bits = np.asarray(group_scores, float), np.asarray(group_bits, float)
            order = np.lexsort((group_scores, group_bits))
            best_before = np.minimum.accumulate(np.concatenate([[np.inf], group_scores[order][:-1]]))
            kept = order[group_scores[order] < best_before]
            self.kept.append(kept)
            self.bits.append(group_bits[kept])
            self.scores.append(group_scores[kept])

    def solve(self, capacity: float) -> list[int]:
        """Index (into each group's original items) of the chosen item per group."""
        groups = len(self.bits)
        upgrades = _HullUpgrades(self.bits, self.scores)
        everyone = np.ones(groups, dtype=bool)
        residual = capacity - sum(b[0] for b in self.bits)
        levels, critical = upgrades.relaxation(everyone, residual)
        incumbent = self._top_up(levels, residual - sum(self.bits[g][k] - self.bits[g][0] for g, k in enumerate(levels)))
        incumbent_score = math.fsum(self.scores[g][k] for g, k in enumerate(incumbent))
        allowed = self._reduce(capacity, critical, incumbent, incumbent_score)
        better = self._dynamic_program(allowed, capacity, incumbent_score)
        picks = incumbent if better is None else better
        return [int(self.kept[g][k]) for g, k in enumerate(picks)]

    def _top_up(self, levels: list[int], spare: float) -> list[int]:
        """The LP's rounded-down solution, improved by single-item swaps (biggest saving first) that fit."""
        picks = list(levels)
        swaps = sorted(
            ((self.scores[g][picks[g]] - self.scores[g][k], g, k) for g in range(len(picks)) for k in range(picks[g] + 1, len(self.bits[g]))),
            reverse=True,
        )  # fmt: skip
        for _, g, k in swaps:
            extra = self.bits[g][k] - self.bits[g][picks[g]]
            if k > picks[g] and extra <= spare:
                spare -= extra
                picks[g] = k
        return picks

    def _reduce(self, capacity: float, critical: float | None, incumbent: list[int], incumbent_score: float) -> list[np.ndarray]:
        """Per group, the items whose Lagrangian bound at the LP multiplier can still beat the incumbent."""
        allowed = [np.arange(len(b)) for b in self.bits]
        if critical is None:  # the LP optimum is integral: the incumbent contains it
            return [np.array([k]) for k in incumbent]
        reduced = [s + critical * b for s, b in zip(self.scores, self.bits)]
        lowest = [r.min() for r in reduced]
        bound = math.fsum(lowest) - critical * capacity
        # The Lagrangian bound mixes large terms; keep a wide rounding margin (dropping less is safe).
        margin = 1e-9 * (math.fsum(np.abs(r).max() for r in reduced) + critical * capacity)
        slack = incumbent_score - bound + margin
        for g, r in enumerate(reduced):
            allowed[g] = np.union1d(np.flatnonzero(r - lowest[g] <= slack), [incumbent[g]])
        return allowed

    def _dynamic_program(self, allowed: list[np.ndarray], capacity: float, incumbent_score: float) -> list[int] | None:
        """The best assignment among ``allowed`` items if it beats the incumbent, else None."""
        bits = [self.bits[g][a] for g, a in enumerate(allowed)]
        scores = [self.scores[g][a] for g, a in enumerate(allowed)]
        upgrades = _HullUpgrades(bits, scores)
        cheapest_rest = np.concatenate([np.cumsum([b[0] for b in bits][::-1])[::-1], [0.0]])
        threshold = incumbent_score - _PRUNE_RELATIVE * abs(incumbent_score)
        remaining = np.ones(len(bits), dtype=bool)
        state_bits, state_scores = np.zeros(1), np.zeros(1)
        parents, items = [], []
        for g in range(len(bits)):
            remaining[g] = False
            size = len(bits[g])
            new_bits = (state_bits[:, None] + bits[g][None, :]).ravel()
            new_scores = (state_scores[:, None] + scores[g][None, :]).ravel()
            parent = np.repeat(np.arange(len(state_bits)), size)
            item = np.tile(np.arange(size), len(state_bits))
            spare = capacity - new_bits - cheapest_rest[g + 1]
            keep = spare >= 0
            keep[keep] = new_scores[keep] + upgrades.lower_bound(remaining, spare[keep]) < threshold
            new_bits, new_scores, parent, item = new_bits[keep], new_scores[keep], parent[keep], item[keep]
            order = np.lexsort((new_scores, new_bits))
            new_bits, new_scores, parent, item = new_bits[order], new_scores[order], parent[order], item[order]
            pareto = new_scores < np.minimum.accumulate(np.concatenate([[np.inf], new_scores[:-1]]))
            state_bits, state_scores = new_bits[pareto], new_scores[pareto]
            parents.append(parent[pareto])
            items.append(item[pareto])
            if not len(state_bits):
                return None
        picks, state = [0] * len(bits), int(np.argmin(state_scores))
        for g in reversed(range(len(bits))):
            picks[g] = int(allowed[g][items[g][state]])
            state = parents[g][state]
        return picks


class _HullUpgrades:
    """Every group's lower convex hull of (bits, score), as upgrades sorted by score saved per bit."""

    def __init__(self, bits: list[np.ndarray], scores: list[np.ndarray]):
        group, start, end = [], [], []
        for g, (b, s) in enumerate(zip(bits, scores)):
            hull = [0]
            for k in range(1, len(b)):
                while len(hull) >= 2 and (s[hull[-1]] - s[hull[-2]]) * (b[k] - b[hull[-1]]) >= (s[k] - s[hull[-1]]) * (b[hull[-1]] - b[hull[-2]]):
                    hull.pop()
                hull.append(k)
            group += [g] * (len(hull) - 1)
            start += hull[:-1]
            end += hull[1:]
        self.group = np.array(group, dtype=int)
        self.start, self.end = np.array(start, dtype=int), np.array(end, dtype=int)
        self.extra_bits = np.array([bits[g][e] - bits[g][a] for g, a, e in zip(group, start, end)], dtype=float)
        self.saving = np.array([scores[g][a] - scores[g][e] for g, a, e in zip(group, start, end)], dtype=float)
        order = np.argsort(-(self.saving / np.maximum(self.extra_bits, 1e-300)), kind="stable")
        self.group, self.start, self.end = self.group[order], self.start[order], self.end[order]
        self.extra_bits, self.saving = self.extra_bits[order], self.saving[order]
        self.best_scores = np.array([s[-1] for s in scores])

    def relaxation(self, active: np.ndarray, spare: float) -> tuple[list[int], float | None]:
        """Greedy LP solution over ``active`` groups: the fully taken hull item per group, and the
        critical upgrade's score saved per bit (None when every upgrade fits)."""
        taken = active[self.group]
        cumulative = np.cumsum(np.where(taken, self.extra_bits, 0.0))
        over = np.flatnonzero(taken & (cumulative > spare))
        critical = None
        if len(over):
            taken[over[0] :] = False
            critical = self.saving[over[0]] / self.extra_bits[over[0]]
        levels = np.zeros(len(active), dtype=int)
        levels[self.group[taken]] = self.end[taken]  # hull order: the last upgrade taken wins
        return levels.tolist(), critical

    def lower_bound(self, active: np.ndarray, spare: np.ndarray) -> np.ndarray:
        """LP value of the ``active`` groups for each spare capacity (bits above their cheapest items)."""
        mask = active[self.group]
        extra, saving = self.extra_bits[mask], self.saving[mask]
        bits_after = np.concatenate([[0.0], np.cumsum(extra)])
        # Score after the first p upgrades, summed from the all-taken end: non-negative terms only.
        score_after = np.concatenate([np.cumsum(saving[::-1])[::-1], [0.0]]) + self.best_scores[active].sum()
        full = np.clip(np.searchsorted(bits_after, spare, side="right") - 1, 0, len(extra))
        partial = full < len(extra)
        fraction = np.zeros_like(spare)
        fraction[partial] = (spare[partial] - bits_after[full[partial]]) / extra[full[partial]]
        return score_after[full] - fraction * np.append(saving, 0.0)[full]


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
