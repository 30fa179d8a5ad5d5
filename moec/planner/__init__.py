"""Expert bit-width planner: MC-MoE's pre-loading mixed-precision allocation, plus a whole-model budget.

Pure numpy/scipy (no onnxruntime, torch or transformers: tests/test_walls.py). Its parts:
    stats   moec-stats/1, what `moec calibrate` measured
    sizes   the size model: an expert's bytes on the target that stores it
    solver  the MC-MoE objective and the integer program (HiGHS through scipy.optimize.milp)
    sweep   the Pareto front over budgets, as a table and a plot
    plan    moec-plan/1, the file a compile reads
    checks  one-line input errors (PlanError)
"""

from moec.planner.checks import PlanError
from moec.planner.plan import (DEFAULT_NON_EXPERT, EXPERT_WIDTHS, PLAN_BIT_WIDTHS, PLAN_FORMAT, load_plan, save_plan,
                               validate_plan)
from moec.planner.sizes import DROPPED, FLOAT, avg_bits_budget_bytes, expert_bytes, parse_size
from moec.planner.solver import make_plan, predicted_loss
from moec.planner.stats import STATS_FORMAT, load_stats
from moec.planner.sweep import plot_sweep, sweep, write_sweep_table

__all__ = ["DEFAULT_NON_EXPERT", "DROPPED", "EXPERT_WIDTHS", "FLOAT", "PLAN_BIT_WIDTHS", "PLAN_FORMAT",
           "STATS_FORMAT", "PlanError", "avg_bits_budget_bytes", "expert_bytes", "load_plan", "load_stats",
           "make_plan", "parse_size", "plot_sweep", "predicted_loss", "save_plan", "sweep", "validate_plan",
           "write_sweep_table"]
