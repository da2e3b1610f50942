"""What the MG/OPT paper reports (Gaedke-Merzhäuser et al.), hard-coded as printed, and the
setups and method it pins (§4.1-4.2, §4.5)."""
from __future__ import annotations

MODES = ("table1", "table2", "sensitivity")
TASKS = ("circles", "mnist")

# --- what the paper reports (hard-coded as printed) ------------------------------------------------

#: Table 1: L -> (setup as printed, # V-cycles, U_c, U)
PAPER_TABLE1 = {
    "circles": {1: ("[{1}]", 95, 1.00, 95), 2: ("[(1),{2}]", 32, 3.00, 96), 4: ("[(1),1,2,{2}]", 12, 5.00, 60),
                6: ("[(1),1,1,2,2,{2}]", 7, 5.25, 37), 8: ("[(1),1,1,1,2,2,2,{2}]", 5, 5.19, 26)},
    "mnist": {1: ("[{1}]", 460, 1.00, 460), 2: ("[(1),{2}]", 152, 3.00, 456), 4: ("[(1),1,2,{2}]", 55, 5.00, 275),
              6: ("[(1),1,1,2,2,{2}]", 33, 5.25, 173), 8: ("[(1),1,1,1,2,2,2,{2}]", 28, 5.19, 145)},
}

#: Table 2 (circles, 8 levels): (setup, # V-cycles, U_c as printed, U). The first two printed U_c are
#: swapped with respect to eq. (10) (5.96 for {1}, 5.97 for {2}); the table shows eq. (10)'s values.
PAPER_TABLE2 = (
    ("[1,1,1,1,1,1,1,{1}]", 7, 5.97, 42),
    ("[1,1,1,1,1,1,1,{2}]", 7, 5.96, 42),
    ("[1,1,1,1,1,1,1,{5}]", 6, 5.99, 36),
    ("[1,1,1,1,1,1,1,{10}]", 5, 6.03, 30),
    ("[1,1,1,1,2,2,2,{2}]", 5, 6.19, 31),
    ("[(1),1,1,1,2,2,2,{2}]", 5, 5.19, 26),
)
TABLE2_SWAPPED = (0, 1)   # rows whose printed U_c disagree with eq. (10)

#: §4.5: the grid and the reported mean and relative standard deviation of U(L=1) / U(L=8)
PAPER_SENSITIVITY = {"lrs": (0.05, 0.1, 0.5), "betas": (1e-3, 1e-4, 1e-5),
                     "cycle_L8": "[(1),1,1,1,2,2,2,{2}]", "mean_ratio": 3.54, "rsd_percent": 8.02}

#: the paper's setups (§4.1-4.2) per task
TASK_SETUP = {
    "circles": {"dataset": "circles", "width": 3, "lr": 0.1, "beta": 1e-4, "batch_size": None,
                "target_accuracy": 1.0},
    "mnist": {"dataset": "mnist", "width": 10, "lr": 0.01, "beta": 1e-5, "batch_size": 1000,
              "target_accuracy": 0.93},
}
#: the method of §2-4 pinned, so that later changes of TrainConfig's defaults do not change the reproduction:
#: ReLU blocks, forward Euler on [0, 1], plain (S)GD on every level with a constant learning rate, constant
#: (piecewise-constant) interpolation in time, no multilevel initialization.
PAPER_METHOD = {"T": 1.0, "activation": "relu", "stepper": "euler", "optimizer": "sgd", "interpolation": "constant",
                "lr_schedule": "constant", "cascade": 0, "dtype": "float32"}
#: validation accuracies at which the work spent so far is read off the logs (Table 1), so that levels can be
#: compared even where a run misses the paper's target
THRESHOLDS = {"circles": (0.9, 0.95, 0.99, 1.0), "mnist": (0.8, 0.85, 0.88, 0.9, 0.93)}
FULL = {"blocks": 2048, "seeds": 3, "max_cycles": 3000}
QUICK = {"blocks": 128, "seeds": 2, "max_cycles": 600, "table1_levels": (1, 2, 4)}
